"""params.orchestrate: validated like every section, left out of params.yaml at its defaults,
turned into Prefect's thread pool or prefect-dask's runner; a dead scheduler address fails fast.
(The Dask runs themselves are in test_dask_fanout.py.)"""

from __future__ import annotations

import socket
import time

import pytest
import torch
from prefect.exceptions import ParameterTypeError
from prefect.task_runners import ThreadPoolTaskRunner
from prefect_dask import DaskTaskRunner

from flows.runners import CONNECT_TIMEOUT_S, SchedulerUnreachable, task_runner, worker_torch_threads
from slimforge.config import OrchestrateConfig, ParamsError, dump_params, load_params
from slimforge.stages import STAGE_NAMES


def _load(tmp_path, text: str):
    path = tmp_path / "p.yaml"
    path.write_text(text)
    return load_params(path)


@pytest.mark.parametrize("text,expected", [
    ("orchestrate: {task_runner: spark}", "p.yaml: orchestrate.task_runner: 'spark' is not valid (Input should be 'local' or 'dask')"),
    ("orchestrate: {dask_address: 'localhost:8786'}", "p.yaml: orchestrate.dask_address: 'localhost:8786' is not valid"),
    ("orchestrate: {dask_address: 'tcp://scheduler'}", "orchestrate.dask_address: 'tcp://scheduler'"),
    ("orchestrate: {dask_address: 'tcp://host:99999'}", "orchestrate.dask_address: 'tcp://host:99999'"),
    ("orchestrate: {dask_address: 'http://host:8786'}", "expected tcp://host:port"),
    ("orchestrate: {n_workers: 0}", "orchestrate.n_workers: 0 is not valid (Input should be greater than or equal to 1)"),
    ("orchestrate: {workers: 2}", "orchestrate.workers: 2 is not valid (Extra inputs are not permitted)"),
])
def test_a_bad_orchestrate_value_is_one_line_naming_file_key_and_choices(tmp_path, text, expected):
    with pytest.raises(ParamsError) as e:
        _load(tmp_path, text)
    assert expected in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_the_default_section_is_left_out_of_params_yaml_and_any_other_round_trips(tmp_path):
    default = _load(tmp_path, "train: {epochs: 1}")
    assert "orchestrate" not in dump_params(default)
    text = "orchestrate: {task_runner: dask, dask_address: 'tcp://10.0.0.5:8786', torch_threads: 1}"
    chosen = _load(tmp_path, text)
    again = _load(tmp_path, dump_params(chosen))
    assert again == chosen and again.orchestrate.dask_address == "tcp://10.0.0.5:8786"


def test_the_local_runner_is_the_thread_pool_and_leaves_torch_alone():
    cfg = OrchestrateConfig()
    assert isinstance(task_runner(cfg), ThreadPoolTaskRunner)
    assert worker_torch_threads(cfg) is None


def test_dask_without_an_address_starts_a_local_cluster_of_processes():
    runner = task_runner(OrchestrateConfig(task_runner="dask", n_workers=3, threads_per_worker=2))
    assert isinstance(runner, DaskTaskRunner) and runner.address is None
    assert runner.cluster_kwargs == {"n_workers": 3, "threads_per_worker": 2, "processes": True,
                                     "host": "127.0.0.1", "dashboard_address": "127.0.0.1:0"}


def test_dask_workers_use_this_processs_torch_threads_unless_told():
    assert worker_torch_threads(OrchestrateConfig(task_runner="dask")) == torch.get_num_threads()
    assert worker_torch_threads(OrchestrateConfig(task_runner="dask", torch_threads=1)) == 1


def test_dask_with_a_listening_scheduler_connects_to_it():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        address = f"tcp://127.0.0.1:{server.getsockname()[1]}"
        runner = task_runner(OrchestrateConfig(task_runner="dask", dask_address=address))
    assert isinstance(runner, DaskTaskRunner) and runner.address == address and not runner.cluster_kwargs


def test_an_unreachable_scheduler_fails_within_the_connect_timeout():
    with socket.socket() as s:  # a port nothing listens on once closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.perf_counter()
    with pytest.raises(SchedulerUnreachable) as e:
        task_runner(OrchestrateConfig(task_runner="dask", dask_address=f"tcp://127.0.0.1:{port}"), "p.yaml")
    assert time.perf_counter() - start < CONNECT_TIMEOUT_S + 1
    message = str(e.value)
    assert message.startswith(f"p.yaml: orchestrate.dask_address: no Dask scheduler answers at tcp://127.0.0.1:{port}")
    assert "dask_address: null" in message


def test_until_is_a_choice_of_stages_in_the_flows_form():
    from flows.pipeline import pipeline

    schema = pipeline.parameters.model_dump()["properties"]["until"]
    assert {"enum": list(STAGE_NAMES), "type": "string"} in schema["anyOf"]
    assert pipeline.validate_parameters({"until": "train"})["until"] == "train"
    with pytest.raises(ParameterTypeError, match="until"):
        pipeline.validate_parameters({"until": "trian"})
