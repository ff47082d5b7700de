"""Click commands: parse, call one api function, render."""
