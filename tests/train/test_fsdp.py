"""--fsdp (FSDP2 over 2 CPU processes with gloo): the same loss curve as one process, an exact resume from the
sharded checkpoint, and an ordinary HF model dir from the gathered weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gptlab.errors import GptlabError
from gptlab.train.loop import LoopConfig
from tests.train.conftest import free_port
from tests.train.test_train import losses, make_trainer

pytestmark = pytest.mark.usefixtures("one_thread")




def _worker(rank: int, port: int, data: str, out: str) -> None:
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from gptlab.train.runtime import init_distributed

    dist = init_distributed(torch.device("cpu"))
    out = Path(out)
    try:
        # 2 processes x 1 sequence x 2 accumulated micro-batches: the same 4 sequences per step as one process
        # with 2 x 2 (a micro-batch's rows are drawn by its number, then split between the processes)
        kw = dict(batch_size=1, grad_accum=2, dist=dist, dropout=0.0, fsdp=True)
        make_trainer(Path(data), out / "whole", **kw).fit()
        make_trainer(Path(data), out / "split", stop_at_step=4, **kw).fit()  # a session that ends at step 4
        make_trainer(Path(data), out / "split", resume=True, **kw).fit()  # and one that resumes from its shards
    finally:
        torch.distributed.destroy_process_group()


def test_fsdp_two_processes_match_one_and_resume_exactly(pydocs, tmp_path):
    import torch.multiprocessing as mp

    port = free_port()
    mp.spawn(_worker, args=(port, str(pydocs), str(tmp_path)), nprocs=2, join=True)
    one = make_trainer(pydocs, tmp_path / "one", batch_size=2, grad_accum=2, dropout=0.0)
    one.fit()

    curve, ref = losses(tmp_path / "whole"), losses(tmp_path / "one")
    assert sorted(curve) == sorted(ref) == list(range(1, 9))
    for step in ref:
        assert abs(curve[step] - ref[step]) < 1e-5, (step, curve[step], ref[step])
    # the HF dir in last/ holds the whole weights, gathered from both shards: the one-process weights
    whole = load_file(str(tmp_path / "whole" / "last" / "model.safetensors"))
    for k, v in one.model.state_dict().items():
        if k in whole:
            torch.testing.assert_close(whole[k], v, rtol=1e-4, atol=1e-5)
    from gptlab import load

    assert load(tmp_path / "whole" / "last").config.n_layer == 2  # an ordinary model dir
    trainer_dir = tmp_path / "whole" / "last" / "trainer"
    assert sorted(p.name for p in trainer_dir.glob("shard-*.safetensors")) == ["shard-0.safetensors",
                                                                              "shard-1.safetensors"]
    assert json.loads((trainer_dir / "state.json").read_text())["world"] == 2

    # stopped at step 4 and resumed: the same losses, bit for bit, and the same final weights
    assert losses(tmp_path / "split") == curve
    split = load_file(str(tmp_path / "split" / "last" / "model.safetensors"))
    assert split.keys() == whole.keys()
    for k in whole:
        assert torch.equal(split[k], whole[k]), k


def test_fsdp_refuses_muon_and_a_checkpoint_without_shards(tmp_path):
    from gptlab.train.guards import check_loop_config
    from gptlab.train.fsdp import load_shards

    with pytest.raises(GptlabError, match="cannot run with --fsdp"):
        check_loop_config(LoopConfig(optimizer="muon", fsdp=True))
    with pytest.raises(GptlabError, match="shard-1.safetensors is missing"):
        load_shards(torch.nn.Linear(2, 2), torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=1), tmp_path, 1)
    (tmp_path / "shard-0.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(GptlabError, match="not a readable safetensors file"):
        load_shards(torch.nn.Linear(2, 2), torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=1), tmp_path, 0)
