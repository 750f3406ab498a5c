"""Run by test_streaming.py in a child process under a memory limit (RLIMIT_DATA: the process's heap
and private memory). argv: stream|load, model folder, output folder, limit in MiB."""

import dataclasses
import resource
import sys


def main(mode: str, src: str, out: str, limit_mib: int) -> None:
    limit = limit_mib << 20
    resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
    import torch

    import leanlm
    from leanlm.quant.streaming import quantize_streaming

    torch.set_num_threads(2)
    if mode == "load":  # the float model as a whole: must not fit
        leanlm.load(src)
        return
    calib = torch.randint(0, 49152, (2, 32), generator=torch.Generator().manual_seed(0))
    sq = leanlm.get_recipe("int8_sq")  # W8A8 SmoothQuant with static ranges, at a fixed alpha (no search)
    quantize_streaming(src, dataclasses.replace(sq, options={**sq.options, "alpha": 0.5}), calib, out, progress=False)
    status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines())
    print("peak", status["VmHWM"].strip(), "data", status["VmData"].strip())


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))
