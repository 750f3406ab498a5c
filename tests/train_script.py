"""QAT on a tiny model, run by test_train.py in one process and under torchrun in two; writes JSON."""

import json
import sys

import torch

from tiny import tiny_llama


def run(out: str | None = None, micro_batch: int = 2) -> dict:
    import leanlm.train as lt
    from leanlm.train import distributed as dist

    torch.set_num_threads(1)
    model = tiny_llama(seed=1)
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, 256, (16, 32), generator=g)
    cfg = lt.TrainConfig(batch_size=4, micro_batch=micro_batch, lr=1e-3, bf16=False, seq_len=32)
    lt.qat(model, "w4a16_rtn_g64", data, config=cfg, progress=False)
    result = {"loss": [h["loss"] for h in model.leanlm_training["history"] if "loss" in h],
              "weight": model.model.layers[0].mlp.down_proj._dequantize_frozen().sum().item()}
    if out is not None and dist.is_main():
        with open(out, "w") as f:
            json.dump(result, f)
    return result


if __name__ == "__main__":
    run(sys.argv[1], micro_batch=int(sys.argv[2]))
