"""The try-it page served at `/`: plain HTML + JS, no build step. `?text=...&autorun=1` fills the box and
submits it (links to an example, and the browser test); `&text_pair=...` fills the second box of a pair
model, which /info announces (`"inputs": "pair"`). A regression model shows its score."""

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>loraship: try the model</title>
<style>
  body { font: 15px/1.4 system-ui, sans-serif; max-width: 46rem; margin: 2rem auto; padding: 0 1rem; color: #222; }
  textarea { width: 100%; height: 6rem; font: inherit; padding: .5rem; box-sizing: border-box; }
  button { font: inherit; padding: .4rem 1.2rem; margin-top: .5rem; }
  .row { display: flex; align-items: center; gap: .6rem; margin: .3rem 0; }
  .name { width: 10rem; text-align: right; }
  .bar { height: 1.1rem; background: #3b7dd8; border-radius: 3px; }
  .score { width: 4rem; font-variant-numeric: tabular-nums; }
  #error { color: #b00020; }
  #info { color: #555; font-size: 13px; margin-top: 2rem; white-space: pre-wrap; }
</style>
</head>
<body>
<h1>Try the model</h1>
<form id="form">
  <textarea id="text" placeholder="Type a text to classify"></textarea>
  <textarea id="text-pair" placeholder="Second text of the pair" hidden></textarea>
  <button type="submit">Classify</button>
</form>
<p><span id="top-what">Top label</span>: <strong id="top-label">-</strong></p>
<div id="bars"></div>
<p id="error"></p>
<div id="info"></div>
<script>
const form = document.getElementById("form"), text = document.getElementById("text"), pair = document.getElementById("text-pair");
let pairModel = false, regression = false;
async function classify(value) {
  document.getElementById("error").textContent = "";
  const r = await fetch("/predict", {method: "POST", headers: {"content-type": "application/json"},
                                     body: JSON.stringify({inputs: value})});
  const body = await r.json();
  if (!r.ok) { document.getElementById("error").textContent = body.error_type + ": " + body.error; return; }
  const bars = document.getElementById("bars");
  bars.innerHTML = "";
  if (regression) {
    document.getElementById("top-what").textContent = "Score (" + body[0].label + ")";
    document.getElementById("top-label").textContent = body[0].score.toFixed(3);
    return;
  }
  for (const s of body) {
    const row = document.createElement("div"); row.className = "row";
    const name = document.createElement("span"); name.className = "name"; name.textContent = s.label;
    const bar = document.createElement("div"); bar.className = "bar"; bar.style.width = (s.score * 20) + "rem";
    const score = document.createElement("span"); score.className = "score"; score.textContent = s.score.toFixed(3);
    row.append(name, bar, score); bars.append(row);
  }
  const multi = body.length && "chosen" in body[0];
  document.getElementById("top-what").textContent = multi ? "Labels" : "Top label";
  document.getElementById("top-label").textContent =
    multi ? (body.filter(s => s.chosen).map(s => s.label).join(", ") || "(none above its threshold)") : body[0].label;
}
function submit() {
  if (!text.value.trim()) return;
  if (pairModel) { if (pair.value.trim()) classify([text.value, pair.value]); } else classify(text.value);
}
form.addEventListener("submit", (e) => { e.preventDefault(); submit(); });
const params = new URLSearchParams(location.search);
const info = fetch("/info").then(r => r.json()).then(i => {
  pairModel = i.inputs === "pair"; regression = i.task === "regression";
  pair.hidden = !pairModel;
  if (pairModel) { text.placeholder = "First text (" + i.input_fields.text + ")"; pair.placeholder = "Second text (" + i.input_fields.text_pair + ")"; }
  document.getElementById("info").textContent =
    "model: " + i.model + " (" + i.task.replace("_", "-") + ")\\nvariant: " + i.variant + (i.quantization ? " (" + i.quantization + ")" : "") +
    (pairModel ? "\\ninputs: pairs (" + i.input_fields.text + ", " + i.input_fields.text_pair + ")" : "") +
    "\\n" + (regression ? "target: " : "labels: ") + i.labels.join(", ") + "\\nmax length: " + i.max_length + " tokens\\nversion: " + i.version;
});
if (params.get("text")) {
  text.value = params.get("text");
  pair.value = params.get("text_pair") || "";
  if (params.get("autorun")) info.then(submit);  // after /info: the page must know whether the model reads pairs
}
</script>
</body>
</html>
"""
