import argparse

import pytest

from duopool.common.config import (
    ConfigError,
    RouterConfig,
    WorkerConfig,
    add_config_arguments,
    config_from_namespace,
    resolve_cpus,
)

pytestmark = pytest.mark.unit


def parse(cls, argv, env=None):
    p = argparse.ArgumentParser()
    add_config_arguments(p, cls)
    return config_from_namespace(cls, p.parse_args(argv), environ=env or {})


def test_flag_beats_env_beats_default():
    cfg = parse(WorkerConfig, ["--port", "7001"], {"DUOPOOL_PORT": "7002", "REDIS_URL": "redis://x", "DUOPOOL_ROLE": "decode"})
    assert cfg.port == 7001 and cfg.redis_url == "redis://x" and cfg.role == "decode"
    assert cfg.pool_or_default == "strict"
    assert parse(RouterConfig, []).port == 50051


@pytest.mark.parametrize(("argv", "env", "field"), [
    ([], {}, "redis_url"),
    (["--redis-url", "r", "--max-model-len", "0"], {}, "max_model_len"),
    (["--redis-url", "r", "--port", "70000"], {}, "port"),
    (["--redis-url", "r"], {"DUOPOOL_THREADS": "two"}, "threads"),
    (["--redis-url", "r"], {"DUOPOOL_ENGINE": "tpu"}, "engine"),
    (["--redis-url", "r", "--threads", "-1"], {}, "threads"),
    (["--redis-url", "r", "--cpus", "share:2/2"], {}, "cpus"),
    (["--redis-url", "r", "--cpus", "share:1"], {}, "cpus"),
    (["--redis-url", "r", "--cpus", "0-x"], {}, "cpus"),
])
def test_errors_name_the_field(argv, env, field):
    with pytest.raises(ConfigError) as err:
        parse(WorkerConfig, argv, env)
    assert err.value.field == field
    assert str(err.value).startswith(field + ":")


def test_configs_are_frozen():
    cfg = parse(RouterConfig, [])
    with pytest.raises(AttributeError):
        cfg.port = 1  # type: ignore[misc]


def test_settings_doc_is_current():
    import pathlib

    from duopool.common.config import render_settings_markdown

    doc = pathlib.Path(__file__).resolve().parents[2] / "docs" / "configuration.md"
    assert doc.read_text() == render_settings_markdown(), \
        "docs/configuration.md is stale: python -m duopool.common.config > docs/configuration.md"


def test_cpu_shares_split_the_usable_cores_and_leave_too_few_unpinned():
    cores = {0, 1, 2, 3, 4}
    assert [resolve_cpus(f"share:{i}/2", cores) for i in range(2)] == [{0, 1}, {2, 3}]  # core 4 unused
    assert resolve_cpus("share:2/3", cores) == {2}
    assert resolve_cpus("share:0/1", cores) == cores
    assert resolve_cpus("share:1/8", cores) is None  # fewer cores than shares: not pinned
    assert resolve_cpus("0-1,3", cores) == {0, 1, 3}
    cfg = parse(WorkerConfig, ["--redis-url", "r", "--cpus", "share:0/1", "--threads", "0"])
    assert cfg.cpus == "share:0/1" and cfg.threads == 0
