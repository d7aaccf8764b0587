import os
import subprocess
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def test_two_ranks_share_identical_queues_and_weights_and_compile_one_graph(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
           str(HERE / "dist_model_script.py"), str(tmp_path)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    # 5 steps of 4 + 3 samples = 35 entries through a queue of 16: it has wrapped around.
    assert r0["filled"] == r1["filled"] == 16
    for key in ("queue_image", "queue_text", "queue_ids"):
        assert torch.equal(r0[key], r1[key]), key
    # The queue holds both ranks' samples (rank 1's image ids are >= 100).
    ids = set(r0["queue_ids"].tolist())
    assert any(i >= 100 for i in ids) and any(i < 100 for i in ids)
    # DDP kept the trainable weights in step although each rank saw different data.
    for name, tensor in r0["trainable"].items():
        assert torch.equal(tensor, r1["trainable"][name]), name
    assert r0["losses"] != r1["losses"]
    for r in (r0, r1):
        assert r["gathered_rows"] == 7
        assert torch.equal(r["x_grad"], r["expected_grad"])
        # The compiled forward (scope forward) stays one graph across ranks and matches eager.
        assert r["forward_frames"] == 1
        eager, compiled = r["forward_eager"], r["forward_compiled"]
        torch.testing.assert_close(compiled["loss"], eager["loss"], atol=1e-5, rtol=1e-5)
        assert compiled["grads"].keys() == eager["grads"].keys()
        for name, grad in eager["grads"].items():
            torch.testing.assert_close(compiled["grads"][name], grad, atol=1e-5, rtol=1e-4, msg=name)
