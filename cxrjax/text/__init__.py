"""Report text: tokenizer trained on the report corpus."""
