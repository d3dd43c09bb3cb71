"""What a user brings: checkpoints and the rules for loading them safely (``checkpoint``,
``factory``), calibration and evaluation data behind one reader contract (``calibration``), the
fit of that data to the model's inputs (``fit``), tensor specs (``specs``) and tokenizers
(``tokenizer``)."""
