"""Modeling code shipped inside exported model folders (see nopetrain/export.py).

`nopetrain.export` copies these files next to config.json and the weights, so that
`AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)` can build the model without nopetrain installed.
They import transformers (not nopetrain) and are not imported by the training code.
"""
