"""OperatorConfig: where each setting comes from (defaults, environment, flags) and the
rule each value must keep, with errors that name the field."""

from __future__ import annotations

import pytest
from gpucloud_operator.config import OperatorConfig
from gpucloud_operator.main import parse_args


def test_construction_reads_no_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPUCLOUD_OPERATOR_TICK_INTERVAL_S", "3")
    monkeypatch.setenv("GPUCLOUD_CLOCK", "file:/tmp/clock")
    assert OperatorConfig().tick_interval_s == 30.0 and OperatorConfig().clock == "system"
    cfg = OperatorConfig.from_env()  # os.environ
    assert (cfg.tick_interval_s, cfg.clock) == (3.0, "file:/tmp/clock")


def test_shared_names_and_the_operators_own_name_wins() -> None:
    shared = {"GPUCLOUD_LEDGER_URL": "sqlite:///shared.db", "GPUCLOUD_CLOCK": "file:/c"}
    cfg = OperatorConfig.from_env(shared)
    assert (cfg.ledger_url, cfg.clock) == ("sqlite:///shared.db", "file:/c")
    own = OperatorConfig.from_env({**shared, "GPUCLOUD_OPERATOR_LEDGER_URL": "sqlite:///op.db"})
    assert own.ledger_url == "sqlite:///op.db"
    # unrelated and unknown variables are not settings
    assert OperatorConfig.from_env({"GPUCLOUD_OPERATOR_NOPE": "1", "LEDGER_URL": "x"}) == (
        OperatorConfig()
    )


def test_empty_strings_refused_except_where_empty_means_none() -> None:
    for name in ("namespaces", "webhook_url", "disk_nfs_server", "disk_nfs_path"):
        cfg = OperatorConfig.from_env({f"GPUCLOUD_OPERATOR_{name.upper()}": ""})
        assert getattr(cfg, name) == ""
    for name in ("ledger_url", "clock", "pricebook", "data_root", "model_stats_url"):
        with pytest.raises(ValueError, match=f"^{name}: String should have at least 1"):
            OperatorConfig().with_overrides({name: ""})
    with pytest.raises(ValueError, match=r"^ledger_url: String should have at least"):
        OperatorConfig.from_env({"GPUCLOUD_LEDGER_URL": ""})


@pytest.mark.parametrize(
    ("name", "raw", "rule"),
    [
        ("storage_interval_s", "0", "greater than 0"),
        ("cost_refresh_s", "-1", "greater than or equal to 0"),
        ("order_ttl_s", "-5", "greater than or equal to 0"),
        ("package_week_s", "0", "greater than 0"),
        ("metrics_port", "-1", "greater than or equal to 0"),
        ("peering_lifetime_s", "1.5", "valid integer"),
        ("tick_interval_s", "fast", "valid number"),
        ("sweep_max_interval_s", "0", "greater than 0"),
    ],
)
def test_numbers_keep_their_rule(name: str, raw: str, rule: str) -> None:
    with pytest.raises(ValueError, match=f"^{name}: Input should be .*{rule}.*got '{raw}'"):
        OperatorConfig.from_env({f"GPUCLOUD_OPERATOR_{name.upper()}": raw})


def test_zero_where_zero_is_allowed() -> None:
    cfg = OperatorConfig().with_overrides({"cost_refresh_s": "0", "metrics_port": "0"})
    assert (cfg.cost_refresh_s, cfg.metrics_port) == (0.0, 0)


def test_flags_win_over_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPUCLOUD_OPERATOR_METERING_GRACE_S", "5")
    monkeypatch.setenv("GPUCLOUD_LEDGER_URL", "sqlite:///env.db")
    _, cfg = parse_args(["--metering-grace-s", "7", "--pricebook", "gold"])
    assert (cfg.metering_grace_s, cfg.pricebook, cfg.ledger_url) == (7, "gold", "sqlite:///env.db")
    _, cfg = parse_args(["--ledger-url", "sqlite:///flag.db"])
    assert cfg.ledger_url == "sqlite:///flag.db"


def test_a_bad_flag_or_variable_is_a_usage_error(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(SystemExit) as exit_:
        parse_args(["--tick-interval-s", "0"])
    assert exit_.value.code == 2
    assert "tick_interval_s: Input should be greater than 0" in capsys.readouterr().err
    monkeypatch.setenv("GPUCLOUD_OPERATOR_ORDER_TTL_S", "-1")
    with pytest.raises(SystemExit) as exit_:
        parse_args([])
    assert exit_.value.code == 2
    assert "order_ttl_s: Input should be greater than or equal to 0" in capsys.readouterr().err


def test_the_config_is_frozen() -> None:
    with pytest.raises(ValueError, match="frozen"):
        OperatorConfig().tick_interval_s = 1  # type: ignore[misc]
