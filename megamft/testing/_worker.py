"""One rank of a `megamft.testing.distributed.launch` job."""

import importlib.util
import os
import pickle
import sys
import traceback
from pathlib import Path


def _load_function(file: str, qualname: str):
    spec = importlib.util.spec_from_file_location(f"_megamft_job_{Path(file).stem}", file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    target = module
    for part in qualname.split("."):
        target = getattr(target, part)
    return target


def main(workdir: Path) -> int:
    rank = int(os.environ["RANK"])
    try:
        from megamft.emulation import cpu_emulation

        cpu_emulation.enable_if_no_cuda()
        job = pickle.loads((workdir / "job.pkl").read_bytes())
        result = _load_function(job["file"], job["qualname"])(**job["kwargs"])
        (workdir / f"result{rank}.pkl").write_bytes(pickle.dumps(result))
        return 0
    except BaseException:
        (workdir / f"error{rank}.txt").write_text(traceback.format_exc())
        return 1


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
