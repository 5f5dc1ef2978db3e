"""Programs over a train.py workdir other than train.py itself: sampling a trained decoder
(`python -m tools.sample`) and Hugging Face weights in and out (`python -m tools.hf`). They sit
on top of every layer, like train.py: they read the trainer's workdir (config.json, checkpoints)
and rebuild the model and the task it trained with."""
