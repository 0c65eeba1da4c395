"""Properties of the validation layer (autofit/validate.py) over numbers, strings and JSON: a value is returned
exactly when it is of the right type and in range, and everything else is refused with autofit's own one-line error,
never another exception."""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from autofit import data, planner, validate
from autofit.errors import AutofitError, ConfigError, DataError, ModelError
from autofit.plans import Plan
from autofit.sim import simulate
from tests.conftest import tiny_gpt2

ANYTHING = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True, allow_infinity=True),
                     st.text(max_size=20), st.binary(max_size=5), st.lists(st.integers(), max_size=3),
                     st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                    max_leaves=20)
FAST = settings(max_examples=300, deadline=None)


def one_line(err: Exception) -> bool:
    return "\n" not in str(err) and str(err).strip() != ""


@FAST
@given(value=ANYTHING, low=st.integers(-5, 5), span=st.integers(0, 100))
def test_integer_returns_exactly_the_whole_numbers_in_range(value, low, span):
    high = low + span
    ok = isinstance(value, int) and not isinstance(value, bool) and low <= value <= high
    try:
        result = validate.integer("x", value, low=low, high=high)
    except ConfigError as err:
        assert not ok and one_line(err) and str(err).startswith("x must be a whole number")
    else:
        assert ok and result == value and type(result) is int


@FAST
@given(value=ANYTHING, low=st.floats(-10, 10), high=st.floats(-10, 10), low_open=st.booleans(),
       high_open=st.booleans())
def test_finite_float_returns_exactly_the_finite_numbers_in_range(value, low, high, low_open, high_open):
    real = isinstance(value, (int, float)) and not isinstance(value, bool)
    inside = real and math.isfinite(value) and (value > low if low_open else value >= low) and \
        (value < high if high_open else value <= high)
    try:
        result = validate.finite_float("f", value, low=low, high=high, low_open=low_open, high_open=high_open)
    except ConfigError as err:
        assert not inside and one_line(err) and str(err).startswith("f must be")
    else:
        assert inside and result == value


@FAST
@given(value=st.one_of(ANYTHING, st.sampled_from(simulate.PRECISIONS + simulate.METHODS)))
def test_choice_returns_exactly_the_allowed_strings(value):
    try:
        result = validate.choice("precision", value, simulate.PRECISIONS)
    except ConfigError as err:
        assert value not in simulate.PRECISIONS and one_line(err) and "must be one of" in str(err)
    else:
        assert result == value and value in simulate.PRECISIONS


@FAST
@given(value=ANYTHING)
def test_flags_are_true_or_false(value):
    try:
        assert validate.flag("f", value) is value
    except ConfigError as err:
        assert not isinstance(value, bool) and one_line(err)


@FAST
@given(raw=st.one_of(st.text(max_size=8), st.integers(-10, 10**6).map(str)))
def test_autofit_workers_must_be_a_whole_number_of_processes(raw):
    assume("\x00" not in raw)
    try:
        number = int(raw.strip())
    except ValueError:
        number = None
    ok = not raw.strip() or (number is not None and 1 <= number <= validate.MAX_WORKERS)
    saved = os.environ.get("AUTOFIT_WORKERS")
    os.environ["AUTOFIT_WORKERS"] = raw
    try:
        validate.environment()
    except ConfigError as err:
        assert not ok and one_line(err) and "AUTOFIT_WORKERS" in str(err)
    else:
        assert ok
    finally:
        os.environ["AUTOFIT_WORKERS"] = saved if saved is not None else "1"


@FAST
@given(texts=st.lists(st.text(alphabet=" \t\na", max_size=4), max_size=8))
def test_samples_keep_exactly_the_ones_with_text(texts):
    kept = [t for t in texts if t.strip()]
    try:
        assert validate.samples(texts) == kept
    except DataError as err:
        assert not kept and one_line(err)


FIGURES = ("n_layer", "hidden_size", "vocab_size", "n_positions", "num_key_value_heads")
CONFIGS = st.one_of(JSON, st.fixed_dictionaries(
    {"model_type": st.one_of(st.text(max_size=5), JSON)},
    optional={key: st.one_of(JSON, st.integers(-2, 10**8)) for key in FIGURES}))


@FAST
@given(value=CONFIGS)
def test_a_config_file_is_an_object_with_a_model_type_and_sane_figures(value):
    sane = isinstance(value, dict) and isinstance(value.get("model_type"), str) and value["model_type"].strip() and \
        all(value.get(k) is None or (type(value[k]) is int and 1 <= value[k] <= high)
            for names, (low, high) in validate._CONFIG_INTS.items() for k in names)
    try:
        assert validate.config_data(value, "config.json") is value
    except ModelError as err:
        assert not sane and one_line(err) and "config.json" in str(err)
    else:
        assert sane


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(value=JSON)
def test_plan_from_json_reads_a_plan_or_says_in_one_line_why_not(value):
    try:
        Plan.from_json(json.dumps(value))
    except AutofitError as err:
        assert one_line(err)
    else:
        pytest.fail(f"read a plan from {value!r}")


@pytest.fixture(scope="module")
def plan_dict():
    return planner.plan(tiny_gpt2(), "cpu", seq_len=32, effective_batch=4, method="full", probe=False).to_dict()


_FIELDS = ["method", "quantization", "precision", "optimizer", "batch_size", "grad_accum", "effective_batch", "seq_len",
           "eval_batch_size", "budget_bytes", "tokens_per_second", "source", "seq_len_source", "truncated_share",
           "gradient_checkpointing", "lora_r", "reasons", "gpu", "estimate", "trials", "model_name"]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(field=st.sampled_from(_FIELDS), value=JSON)
def test_any_field_of_a_plan_file_changed_to_any_json_is_read_or_refused_in_one_line(plan_dict, field, value):
    changed = dict(plan_dict, **{field: value})
    text = json.dumps(changed)
    try:
        plan = Plan.from_json(text)
    except AutofitError as err:
        assert one_line(err)
    else:  # what was read back is what was written, and a sound plan
        assert plan.batch_size * plan.grad_accum == plan.effective_batch and math.isfinite(plan.tokens_per_second)
        if field not in ("gpu", "estimate", "reasons", "trials"):
            assert json.loads(plan.to_json())[field] == value


@settings(max_examples=150, deadline=None)
@given(text=st.text(max_size=200), suffix=st.sampled_from([".txt", ".jsonl", ".json"]))
def test_a_data_file_of_any_text_gives_samples_or_one_line(text, suffix):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"data{suffix}"
        path.write_text(text, encoding="utf-8")
        try:
            samples = data.load_samples(path)
        except DataError as err:
            assert one_line(err)
        else:
            assert samples and all(validate._has_text(s) for s in samples)


@settings(max_examples=100, deadline=None)
@given(value=JSON)
def test_a_data_file_of_any_json_record_gives_samples_or_one_line(value):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "data.jsonl"
        path.write_text(json.dumps(value) + "\n")
        try:
            samples = data.load_samples(path)
        except DataError as err:
            assert one_line(err)
        else:
            assert samples and all(isinstance(s, (str, list)) for s in samples)


@settings(max_examples=60, deadline=None)
@given(rank=st.one_of(st.integers(-3, 10**6), st.floats(allow_nan=True), st.text(max_size=4)))
def test_a_lora_rank_lies_within_the_layer_width(rank, gpt2_spec_module):
    ok = isinstance(rank, int) and not isinstance(rank, bool) and 1 <= rank <= gpt2_spec_module.hidden_size
    try:
        assert validate.lora_rank(gpt2_spec_module, rank) == rank
    except ConfigError as err:
        assert not ok and one_line(err)


@pytest.fixture(scope="module")
def gpt2_spec_module():
    from autofit import model

    return model.resolve(tiny_gpt2())


@settings(max_examples=60, deadline=None)
@given(batch=st.integers(1, 10**13), seq=st.integers(2, 128))
def test_a_micro_batch_is_refused_exactly_when_its_hidden_states_exceed_any_card(batch, seq, gpt2_spec_module):
    least = batch * seq * gpt2_spec_module.hidden_size * 2
    try:
        validate.batch_shape(gpt2_spec_module, batch, seq)
    except ConfigError as err:
        assert least > validate.MAX_DEVICE_BYTES and "more than any card" in str(err)
    else:
        assert least <= validate.MAX_DEVICE_BYTES
