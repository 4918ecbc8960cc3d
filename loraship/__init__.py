"""What two or more stages share: the reader, the label map, file rules and names. Torch-free."""
