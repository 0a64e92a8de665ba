"""Training V1-architecture models on raw bytes, scored exactly as the chain scores them.

    from soma_models.train import TrainConfig, train
    result = train(TrainConfig(data=["corpus/"], config="small", seq_len=512, steps=2000,
                               out_dir="runs/small"))
    print(result.val_ce, result.score, result.weights)

The command line is `soma-models train` (see `soma_models.train.cli`); multi-process
runs go through torchrun (`soma_models.train.distributed`).
"""

from soma_models.train.trainer import TrainConfig, Trainer, TrainError, TrainResult, train

__all__ = ["TrainConfig", "TrainError", "TrainResult", "Trainer", "train"]
