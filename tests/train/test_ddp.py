"""Training past one process: ``train.devices=2`` on the CPU (DDP over gloo) makes one run, written by rank 0, with
epoch metrics over every process's predictions; a second machine (Lightning's cluster variables) takes rank 0's
run and writes nothing of its own; launchers that disagree with the config are refused."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from handlens.core.errors import HandlensError, InputError
from handlens.data.catalog import Run, open_catalog
from handlens.train.module import unshard
from handlens.train.run import RunInterrupted, detect_world, train
from tests.conftest import colour_tree, split_workspace, tiny_config

LIGHTNING_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "WORLD_SIZE", "LOCAL_RANK", "GROUP_RANK", "RANK",
                       "LOCAL_WORLD_SIZE", "TORCHELASTIC_RUN_ID", "SLURM_NTASKS", "SLURM_PROCID")
#: 16 images per class: train 8, val 5, test 3 per class; 15 val images do not split evenly over 2 processes
RATIOS = "0.5,0.3125,0.1875"


@pytest.fixture
def no_launcher(monkeypatch):
    """No launcher's variables in this process (as a plain ``handlens train`` sees it) and no GPU."""
    for name in LIGHTNING_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture
def odd_val_workspace(tmp_path):
    return split_workspace(tmp_path, colour_tree(tmp_path / "colours"), ratios=RATIOS)


def _run_rows(ws):
    catalog = open_catalog(ws.db_url)
    try:
        with catalog.session() as session:
            return [(row.id, row.status) for row in session.query(Run)]
    finally:
        catalog.close()


def _children() -> list[str]:
    """This process's DDP training processes still alive (other tests' children, such as a worker of the jobs
    tests, are not this test's business)."""
    found = subprocess.run(["pgrep", "-P", str(os.getpid()), "-f", "ddp_worker"], capture_output=True, text=True,
                           check=False)
    return found.stdout.split()


@pytest.mark.slow
def test_two_cpu_processes_make_one_run_with_metrics_over_the_whole_val_set(odd_val_workspace, no_launcher, capfd):
    ws = odd_val_workspace
    result = train(tiny_config("train.devices=2", "train.strategy=ddp"), ws)

    assert result.rank == 0 and result.epochs == 2 and [h["epoch"] for h in result.history] == [1, 2]
    assert [p for p in ws.runs_dir.iterdir() if p.is_dir()] == [result.run_dir]  # no second run folder
    assert _run_rows(ws) == [(result.run_id, "finished")]  # no second catalog row
    manifest = json.loads((result.bundle / "bundle.json").read_text())
    assert manifest["run_id"] == result.run_id
    assert json.loads((result.run_dir / "history.json").read_text()) == json.loads(json.dumps(result.history))

    n_val = result.metrics["val"]["n"]  # rank 0's own evaluation of the whole val set after training
    assert n_val == 15
    n_train = len(manifest["split_membership"]["train"])
    # each process trains on its half (12 of 24) in whole batches of 8: both halves' predictions are counted
    both_processes = 2 * ((n_train + 1) // 2 // 8) * 8
    for record in result.history:
        assert record["val"]["n"] == n_val  # not 8 (one process's shard) nor 16 (the sampler's padding)
        assert sum(map(sum, record["val"]["confusion"])) == n_val
        assert record["train"]["n"] == both_processes
    # the gathered predictions are paired with their own images' classes: the best epoch's val confusion is
    # the one rank 0 finds evaluating the best model alone
    assert result.history[result.best_epoch - 1]["val"]["confusion"] == result.metrics["val"]["confusion"]

    err = capfd.readouterr().err
    assert err.count("epoch 1/2") == 1 and err.count("epoch 2/2") == 1 and err.count(" started: ") == 1
    assert not torch.distributed.is_initialized() and not _children()  # the process group and rank 1 are gone
    assert not {"LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT", "NODE_RANK"} & set(os.environ)  # put back for the next run


@pytest.mark.slow
def test_a_stop_request_stops_every_process_and_the_run_resumes_on_two(odd_val_workspace, no_launcher):
    ws = odd_val_workspace
    with pytest.raises(RunInterrupted, match="stopped after epoch 1: cancelled"):
        train(tiny_config("train.devices=2"), ws, should_stop=lambda: "cancelled")  # rank 1 is never asked
    (run_dir,) = ws.runs_dir.iterdir()
    assert (run_dir / "checkpoints" / "last.ckpt").is_file() and not _children()

    resumed = train(None, ws, resume=run_dir.name)
    assert resumed.resumed and resumed.run_id == run_dir.name
    assert [h["epoch"] for h in resumed.history] == [1, 2] and resumed.metrics["val"]["n"] == 15
    assert _run_rows(ws) == [(run_dir.name, "finished")]


def test_a_process_that_fails_before_joining_is_an_error_at_once(odd_val_workspace, no_launcher, monkeypatch):
    import handlens.train.run as run

    monkeypatch.setattr(run, "WORKER_COMMAND", "import sys; sys.exit(3)")  # e.g. a broken environment
    with pytest.raises(HandlensError, match=r"training process 1 \(LOCAL_RANK=1\) failed with exit code 3 .*"
                                            "before joining the run"):
        train(tiny_config("train.devices=2"), odd_val_workspace)
    assert not torch.distributed.is_initialized() and not _children()
    assert _run_rows(odd_val_workspace)[0][1] == "failed"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_a_second_machine_trains_rank_0s_run_and_writes_nothing_of_its_own(odd_val_workspace, tmp_path):
    """Two "machines" (one process each, Lightning's variables): node 1 has a workspace of its own and the same
    catalog (``HANDLENS_DB_URL``), as machines share a PostgreSQL catalog."""
    ws = odd_val_workspace
    node1 = tmp_path / "node1"
    command = [sys.executable, "-m", "handlens.cli.main", "train", "--dataset", "colours", "--backbone", "tiny_cnn",
               "--weights", "none", "--freeze", "full", "--epochs", "2", "--tracking", "none", "train.batch_size=8",
               "train.nodes=2"]
    env = {k: v for k, v in os.environ.items() if k not in LIGHTNING_VARIABLES}
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), HANDLENS_DB_URL=ws.db_url,
               CUDA_VISIBLE_DEVICES="")  # CPU processes (gloo), also where this machine has a GPU
    second = subprocess.Popen([*command[:3], "--workspace", str(node1), *command[3:]], env={**env, "NODE_RANK": "1"},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = subprocess.run([*command[:3], "--workspace", str(ws.root), *command[3:]], env={**env, "NODE_RANK": "0"},
                               capture_output=True, text=True, timeout=240, check=False)
        second_out, second_err = second.communicate(timeout=60)
    finally:
        second.kill()
    assert first.returncode == 0, first.stderr
    assert second.returncode == 0, second_err

    (run_dir,) = ws.runs_dir.iterdir()
    assert first.stdout.strip().splitlines()[-1] == str(run_dir / "bundle")
    assert _run_rows(ws) == [(run_dir.name, "finished")]
    assert not (node1 / "runs").exists() or not any((node1 / "runs").iterdir())  # only its image cache
    assert "epoch 1/2" not in second_err and " started: " not in second_err  # rank 0 reports
    assert second_out.strip() == ""  # and prints the run: another rank prints nothing
    history = json.loads((run_dir / "history.json").read_text())
    assert [h["val"]["n"] for h in history] == [15, 15]


def test_shards_of_an_in_order_distributed_sampler_go_back_in_dataset_order():
    for n, world in ((15, 2), (12, 2), (10, 3), (1, 2)):
        sampler_shards = [torch.tensor(list(torch.utils.data.DistributedSampler(range(n), num_replicas=world, rank=r,
                                                                                shuffle=False)))
                          for r in range(world)]
        assert unshard(sampler_shards, n).tolist() == list(range(n))  # the padding (first samples again) dropped
    shards = [torch.tensor([3, 1]), torch.tensor([2])]
    assert unshard(shards, 3).tolist() == [3, 1, 2]  # not a sampler's shards: concatenated as they are
    assert unshard([torch.tensor([0, 2]), torch.tensor([1, 3])], None).tolist() == [0, 2, 1, 3]


@pytest.mark.parametrize(("overrides", "message"), [
    (["model.freeze=frozen", "train.devices=2"], r"train.devices=2 has no effect with model.freeze=frozen.*"
                                                 r"model.freeze=partial:2 \(or full\) or train.feature_cache=off"),
    (["model.freeze=frozen", "train.nodes=2"], "train.devices=1 x train.nodes=2 has no effect"),
    (["train.strategy=ddp"], r"train.strategy=ddp has no effect with one process.*train.devices=N"),
])
def test_processes_that_change_nothing_are_refused(overrides, message):
    with pytest.raises(InputError, match=message):
        tiny_config(*overrides)


def test_where_a_process_stands_comes_from_the_launcher(no_launcher, monkeypatch):
    settings = tiny_config("train.devices=2").train
    assert detect_world(tiny_config().train) is None
    alone = detect_world(settings)
    assert (alone.rank, alone.size, alone.launches, alone.backend) == (0, 2, True, "gloo")  # starts rank 1 itself

    monkeypatch.setenv("LOCAL_RANK", "1")  # what it gives the process it starts
    started = detect_world(settings)
    assert (started.rank, started.local_rank, started.launches) == (1, 1, False)

    two_nodes = tiny_config("train.devices=2", "train.nodes=2").train
    monkeypatch.delenv("LOCAL_RANK")
    with pytest.raises(InputError, match=r"MASTER_ADDR .*NODE_RANK"):
        detect_world(two_nodes)
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    monkeypatch.setenv("NODE_RANK", "1")
    second = detect_world(two_nodes)
    assert (second.rank, second.size, second.launches) == (2, 4, True)
    monkeypatch.setenv("WORLD_SIZE", "8")
    with pytest.raises(InputError, match=r"WORLD_SIZE=8, but train\.devices x train\.nodes = 2 x 2 = 4"):
        detect_world(two_nodes)


def test_torchrun_processes_must_match_the_config(no_launcher, monkeypatch):
    for name, value in {"TORCHELASTIC_RUN_ID": "x", "RANK": "1", "LOCAL_RANK": "1", "GROUP_RANK": "0",
                        "LOCAL_WORLD_SIZE": "2", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": "29500"}.items():
        monkeypatch.setenv(name, value)
    world = detect_world(tiny_config("train.devices=2").train)
    assert (world.rank, world.local_rank, world.launches) == (1, 1, False)  # torchrun started every process
    with pytest.raises(InputError, match=r"torchrun started 2 processes.*--nproc-per-node"):
        detect_world(tiny_config().train)
    with pytest.raises(InputError, match=r"torchrun started 2 processes, but train\.devices x train\.nodes = 4 x 1"):
        detect_world(tiny_config("train.devices=4").train)


def test_a_module_alone_is_one_process():
    """Outside a DDP run nothing is gathered (no process group): the epoch metrics are the module's own."""
    from handlens.train.module import ClassifierModule

    module = ClassifierModule(torch.nn.Linear(2, 2), ["a", "b"], tiny_config().train, lambda x, **_: x,
                              class_weights=None, on_features=True)
    module._outputs["val"] = [(torch.tensor([[0.9, 0.1], [0.2, 0.8]]), torch.tensor([0, 0]))]
    module._loss_sums["val"] = 1.0
    metrics = module._epoch_metrics("val")
    assert metrics["n"] == 2 and metrics["confusion"] == [[1, 1], [0, 0]] and metrics["loss"] == 0.5
