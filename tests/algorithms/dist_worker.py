"""One rank of the data-parallel test (test_dist.py runs it under torchrun): quantize the tiny model with gloo
data-parallel calibration and save this rank's result to OUT/rank<R> (every rank: to compare their decisions)."""
import sys

import torch
import torch.distributed as dist

from lowbit import api
from lowbit.core.config import QuantConfig
from lowbit.core.scheme import Scheme


def main() -> None:
    model_dir, calib_path, out, method, batch = sys.argv[1:6]
    from lowbit.calibration import sequential

    sequential.BATCH = int(batch)  # samples per calibration batch (the test's one-process run uses the same)
    dist.init_process_group("gloo")
    ids = torch.load(calib_path)
    m, tok = api.load(model_dir, lazy=True)
    opts = {"nsamples": ids.shape[0], "calib_seqlen": ids.shape[1]}
    api.quantize(m, QuantConfig(method=method, scheme=Scheme(4, False, "group", 32), seed=3, options=opts),
                 calib_ids=ids)
    api.save(m, tok, f"{out}/rank{dist.get_rank()}")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
