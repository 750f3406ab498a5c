"""Training on a tiny model, run by test_train.py in one process and under torchrun in two; writes JSON.

`qat` (the default): QAT with learned scales. `distill`: distillation of a 2:4-sparse student from its
dense original, checkpointed in --work and killed after step --kill-at; its trained weights go to
OUT.safetensors. Either shards the model over the processes with --fsdp.
"""

import argparse
import json

import torch

from tiny import tiny_llama


def run(out: str | None = None, micro_batch: int = 2, method: str = "qat", fsdp: bool = False,
        work: str | None = None, kill_at: int | None = None) -> dict:
    import leanlm.train as lt
    from leanlm.train import distributed as dist

    torch.set_num_threads(1)
    model = tiny_llama(seed=1)
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, 256, (16, 32), generator=g)
    if method == "qat":
        cfg = lt.TrainConfig(batch_size=4, micro_batch=micro_batch, lr=1e-3, bf16=False, seq_len=32, fsdp=fsdp)
        lt.qat(model, "w4a16_rtn_g64", data, config=cfg, progress=False, learn_scales=True)
        result = {"loss": [h["loss"] for h in model.leanlm_training["history"] if "loss" in h],
                  "weight": model.model.layers[0].mlp.down_proj._dequantize_frozen().sum().item()}
    else:
        from leanlm.prune.sparsity import sparsify

        teacher = tiny_llama(seed=1)
        sparsify(model, "magnitude", "2:4")
        zeros = {n: p == 0 for n, p in model.named_parameters() if (p == 0).any()}

        def on_step(step, record):
            if step == kill_at:
                raise KeyboardInterrupt

        # 5 held-out sequences: under two processes the last evaluation round has one for one of them.
        cfg = lt.TrainConfig(batch_size=4, micro_batch=micro_batch, lr=3e-3, epochs=2, bf16=False, seq_len=32,
                             checkpoint_every=2, eval_every=4, grad_clip=0.5, fsdp=fsdp)
        lt.distill(model, teacher, data, cfg, lt.DistillConfig(ce_weight=0.5), work=work, eval_data=data[:5],
                   progress=False, on_step=on_step)
        history = model.leanlm_training["history"]
        state = {n: p.detach().clone() for n, p in model.state_dict().items()}
        checksum = sum(float(p.double().sum()) for p in state.values())
        result = {"loss": [h["loss"] for h in history if "loss" in h],
                  "grad_norm": [h["grad_norm"] for h in history if "grad_norm" in h],
                  "eval_loss": [h["eval_loss"] for h in history if "eval_loss" in h],
                  "zeros_kept": bool(zeros) and all(torch.equal(state[n] == 0, z) for n, z in zeros.items()),
                  "same_on_every_process": dist.sum_scalar(checksum) == dist.world_size() * checksum}
        if out is not None and dist.is_main():
            from safetensors.torch import save_file

            save_file({n: t.contiguous() for n, t in state.items()}, out + ".safetensors")
    if out is not None and dist.is_main():
        with open(out, "w") as f:
            json.dump(result, f)
    return result


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("micro_batch", type=int)
    ap.add_argument("--method", default="qat", choices=("qat", "distill"))
    ap.add_argument("--fsdp", action="store_true")
    ap.add_argument("--work", default=None)
    ap.add_argument("--kill-at", type=int, default=None)
    a = ap.parse_args()
    run(a.out, a.micro_batch, a.method, a.fsdp, a.work, a.kill_at)
    # Nobody leaves while another process still writes or communicates.
    from leanlm.train import distributed

    distributed.barrier()
