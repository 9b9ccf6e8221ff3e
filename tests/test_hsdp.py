"""HSDP (issue 19, point 3): ``train.parallel: {replicate: R, shard: S}`` builds a 2-D device
mesh and FSDP2 shards the model within each group of S ranks and replicates it across the
R groups. On CPU with gloo and 4 ranks (2 x 2, under torchrun) the losses equal one process
on the same global batch, and a checkpoint written under the 2 x 2 mesh resumes in one
process (DCP reshards), continuing the same curve."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from test_train import _job, _losses, _run_in_subprocess, demo_data  # noqa: F401 (a fixture)

from steelworks.core.config import ConfigError, load
from steelworks.core.faults import fault
from steelworks.platform.settings import PipelineConfig
from steelworks.train.driver import run_training


@pytest.mark.faults  # kills rank 0 mid-run: make test-faults
def test_hsdp_2x2_equals_one_process_and_its_checkpoint_resumes_in_one(demo_data, tmp_path):  # noqa: F811
    straight = tmp_path / "straight"
    job, cfg = _job(demo_data, straight, micro_batch_size=8, ckpt_every=3, max_steps=6)
    run_training(job, cfg, use_ray=False)

    hsdp = tmp_path / "hsdp"
    job, _ = _job(demo_data, hsdp, micro_batch_size=2, ckpt_every=3, max_steps=6, num_workers=4,
                  parallel={"replicate": 2, "shard": 2})
    # Killed after step 4 (rank 0 dies; torchrun stops the others): step 3's checkpoint stays.
    job["faults"] = [fault("train.step", str(tmp_path / "m"), step=4)]
    path = hsdp / "job.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(job))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc-per-node", "4", "-m", "steelworks.train.loop", str(path)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0 and (hsdp / "checkpoints" / "step_00000003").is_dir(), proc.stderr[-3000:]
    assert "HSDP: 2 replica group(s) of 2 shard rank(s)" in proc.stderr
    np.testing.assert_allclose(_losses(hsdp)[:3], _losses(straight)[:3], rtol=2e-4)
    # The same run resumed by one process (no mesh at all): the 2 x 2 checkpoint is resharded.
    del job["faults"]
    job["train"].update(micro_batch_size=8, num_workers=1, parallel={"replicate": 1, "shard": None})
    assert _run_in_subprocess(job) == 0
    np.testing.assert_allclose(_losses(hsdp), _losses(straight), rtol=2e-4)


def test_a_mesh_that_does_not_fit_the_workers_is_an_error():
    cfg = load(PipelineConfig, None, ["pretrain.parallel.replicate=2", "pretrain.parallel.shard=3"])
    with pytest.raises(ValueError, match=r"parallel.replicate=2 x parallel.shard=3 = 6 ranks, but the run has 4"):
        cfg.pretrain.parallel.mesh_shape(4)
    assert cfg.pretrain.parallel.mesh_shape(6) == (2, 3)
    assert load(PipelineConfig, None, ["sft.parallel.replicate=2"]).sft.parallel.mesh_shape(8) == (2, 4)
    with pytest.raises(ConfigError, match="parallel.replicate must be an integer >= 1"):
        load(PipelineConfig, None, ["pretrain.parallel.replicate=0"])


def test_replicate_auto_makes_one_group_per_node():
    """``replicate: auto``: the node count from LOCAL_WORLD_SIZE (ranks per node), each node's
    ranks one shard group; a world that does not split into whole nodes is an error."""
    par = load(PipelineConfig, None, ["pretrain.parallel.replicate=auto"]).pretrain.parallel
    assert par.replicate == "auto"
    assert par.mesh_shape(16, local_world=8) == (2, 8)  # 2 nodes of 8 GPUs
    assert par.mesh_shape(4, local_world=4) == (1, 4)  # one node: flat FSDP
    assert par.mesh_shape(1) == (1, 1)
    with pytest.raises(ValueError, match="12 ranks do not split into nodes of 8"):
        par.mesh_shape(12, local_world=8)
    with pytest.raises(ConfigError, match="replicate"):
        load(PipelineConfig, None, ["pretrain.parallel.replicate=nodes"])
