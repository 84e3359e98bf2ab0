import json
from dataclasses import fields

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


# Listed by hand, not read from the annotations, so that a field whose annotation loses its type is still caught.
BOOL_FIELDS = ["tie_embeddings", "gradient_checkpointing", "use_moe", "shared_expert"]
INT_FIELDS = ["vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len", "ffn_hidden", "num_levels", "num_experts",
              "top_k", "num_expert_groups", "top_groups", "expert_dim", "expert_hidden"]
FLOAT_FIELDS = ["rope_theta", "dropout", "init_std", "capacity_factor", "router_temperature", "router_jitter",
                "aux_loss_weight", "z_loss_weight", "bias_update_rate"]
STR_FIELDS = ["pos_encoding", "attention", "fusion", "attn_impl", "router_scoring", "moe_impl"]


def _refused(field, value):
    with pytest.raises(ValueError) as e:
        VishwamaiConfig(**{field: value})
    message = str(e.value)
    assert message.startswith(f"VishwamaiConfig.{field}: must be ") and "\n" not in message, message
    return message


def test_the_lists_above_cover_every_field():
    listed = BOOL_FIELDS + INT_FIELDS + FLOAT_FIELDS + STR_FIELDS + ["level_windows"]
    assert sorted(listed) == sorted(f.name for f in fields(VishwamaiConfig))


@pytest.mark.parametrize("field", BOOL_FIELDS + INT_FIELDS + FLOAT_FIELDS)
def test_a_string_is_refused_for_every_bool_int_and_float_field(field):
    assert "got 'no' (str)" in _refused(field, "no")


@pytest.mark.parametrize("field", BOOL_FIELDS)
def test_the_strings_false_and_no_in_a_config_file_are_refused(field):
    with pytest.raises(ValueError, match=rf"VishwamaiConfig\.{field}: must be a bool"):
        VishwamaiConfig.from_json(json.dumps({field: "false"}))


@pytest.mark.parametrize("field", INT_FIELDS + FLOAT_FIELDS)
def test_a_bool_is_not_a_number(field):
    _refused(field, True)


@pytest.mark.parametrize("field", INT_FIELDS)
def test_an_int_field_refuses_a_float(field):
    assert "must be an integer" in _refused(field, 2.0)


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
@pytest.mark.parametrize("field", FLOAT_FIELDS)
def test_every_float_field_must_be_finite(field, value):
    assert "must be a finite number" in _refused(field, value)


def test_infinity_in_a_config_file_is_refused():
    with pytest.raises(ValueError, match=r"VishwamaiConfig\.init_std: must be a finite number, got inf"):
        VishwamaiConfig.from_json('{"init_std": Infinity}')


@pytest.mark.parametrize("field", STR_FIELDS)
def test_a_string_field_refuses_a_number(field):
    _refused(field, 1)


@pytest.mark.parametrize("windows", [(64, "32", None), (64, True, None), (64, 32.0, None), "64,32,None", 64])
def test_level_windows_are_checked_entry_by_entry(windows):
    _refused("level_windows", windows)


def test_ints_are_floats_and_lists_are_tuples():
    cfg = VishwamaiConfig.from_json('{"dropout": 0, "rope_theta": 500000, "level_windows": [16, 8, null]}')
    assert (cfg.dropout, cfg.rope_theta, cfg.level_windows) == (0, 500000, (16, 8, None))
    assert VishwamaiConfig.from_json(cfg.to_json()) == cfg
