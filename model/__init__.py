"""Models and their training. Where to add what:

    model/nn/        op forward/backward pairs, C kernels, AdamW, mixed precision, activation memory
    model/data/      tokenizers, corpora, token datasets and batch samplers
    model/gpt2/      GPT-2: config, model, block, generation, Hugging Face checkpoint I/O (one folder
                     per model family)
    model/parallel/  the mesh and the data-, tensor- and pipeline-parallel pieces
    model/training/  TrainConfig, the run directory's files, the single-process training loop

`model.GPT` and `model.GPTConfig` are GPT-2's, imported on first use so that a light module
(model.training.run_dir for the trace tools) does not load the model code.
"""

__all__ = ["GPT", "GPTConfig"]


def __getattr__(name):
    if name == "GPT":
        from ringpipe.model.gpt2.model import GPT
        return GPT
    if name == "GPTConfig":
        from ringpipe.model.gpt2.config import GPTConfig
        return GPTConfig
    raise AttributeError(f"module 'model' has no attribute {name!r}")
