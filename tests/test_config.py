import json

import pytest

from vishwamai import VishwamaiConfig
from vishwamai.config import PRESETS, param_counts


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_round_trip_through_json_files(tmp_path, name):
    cfg = VishwamaiConfig.preset(name)
    path = tmp_path / "config.json"
    cfg.to_json(path)
    assert json.loads(path.read_text())["d_model"] == cfg.d_model
    assert VishwamaiConfig.from_json(path) == cfg


@pytest.mark.parametrize("field,value", [
    ("top_k", 99), ("n_heads", 5), ("capacity_factor", -1.0), ("router_temperature", 0.0),
    ("level_windows", (8, -1, None)), ("pos_encoding", "learned"), ("num_expert_groups", 3),
])
def test_each_invalid_field_is_named_in_the_error(field, value):
    with pytest.raises(ValueError, match=f"VishwamaiConfig.{field}"):
        VishwamaiConfig(**{field: value})


def test_config_file_with_unknown_or_broken_content_is_rejected(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"d_model": 64,')
    with pytest.raises(ValueError, match="invalid JSON"):
        VishwamaiConfig.from_json(bad)
    with pytest.raises(FileNotFoundError):
        VishwamaiConfig.from_json(tmp_path / "missing.json")


def test_active_parameters_grow_with_top_k_but_total_does_not():
    one, two = VishwamaiConfig(top_k=1), VishwamaiConfig(top_k=2)
    assert param_counts(one)["total"] == param_counts(two)["total"]
    assert param_counts(two)["active"] > param_counts(one)["active"]
