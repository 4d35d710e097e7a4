from pathlib import Path

import pytest
import yaml

from dfkd_deploy.core.errors import RecipeError
from dfkd_deploy.recipe import Recipe, load_recipe

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["tiny", "cifar-resnet20", "resnet18"])
def test_shipped_recipes_validate(name):
    r = load_recipe(REPO / "recipes" / f"{name}.yaml")
    assert r.synthesis.method == "fastdfkd"


def test_unknown_key_is_named(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("synthesis:\n  gsteps: 5\n")
    with pytest.raises(RecipeError, match=r"unknown key 'synthesis.gsteps'"):
        load_recipe(p)


def test_bad_choice_lists_allowed_values(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("teacher:\n  layout: NWHC\n")
    with pytest.raises(RecipeError, match=r"teacher.layout: 'NWHC' is not allowed; allowed values: 'NCHW' or 'NHWC'"):
        load_recipe(p)


def test_out_of_range_value_names_key(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("distillation:\n  epochs: 0\n")
    with pytest.raises(RecipeError, match=r"distillation.epochs: .*greater than or equal to 1"):
        load_recipe(p)


def test_invalid_yaml_and_missing_file(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("synthesis: [unclosed\n")
    with pytest.raises(RecipeError, match="not valid YAML at line"):
        load_recipe(p)
    with pytest.raises(RecipeError, match="recipe not found"):
        load_recipe(tmp_path / "nope.yaml")
    p.write_text("- a list\n")
    with pytest.raises(RecipeError, match="mapping of sections"):
        load_recipe(p)


def test_overrides_apply_and_are_checked():
    r = load_recipe(None, {"synthesis.g_steps": 10, "teacher.arch": "cifar_resnet56"})
    assert r.synthesis.g_steps == 10 and r.teacher.arch == "cifar_resnet56"
    with pytest.raises(RecipeError, match="unknown key 'student.width'"):
        load_recipe(None, {"student.width": 3})


def test_resolved_yaml_round_trips(tmp_path):
    r = load_recipe(REPO / "recipes" / "tiny.yaml", {"seed": 7})
    p = tmp_path / "resolved.yaml"
    p.write_text(r.resolved_yaml())
    again = load_recipe(p)
    assert again == r and again.seed == 7
    assert yaml.safe_load(r.resolved_yaml())["distillation"]["epochs"] == r.distillation.epochs


def test_defaults_are_the_paper_fast5_setting():
    r = Recipe()
    assert (r.synthesis.g_steps, r.synthesis.lr_g, r.synthesis.bn, r.synthesis.oh, r.synthesis.adv) == (5, 3e-3, 10.0, 0.5, 1.33)
    assert (r.distillation.epochs, r.distillation.warmup, r.distillation.temperature) == (220, 20, 20.0)


def test_deploy_batch_profile_must_be_ordered():
    assert load_recipe(None, {"deploy.batch_profile": [1, 4, 64]}).deploy.batch_profile == (1, 4, 64)
    with pytest.raises(RecipeError, match=r"deploy.batch_profile: .*min <= opt <= max"):
        load_recipe(None, {"deploy.batch_profile": [8, 4, 64]})


def test_deepinversion_method_fills_its_own_defaults_and_keeps_explicit_keys(tmp_path):
    r = load_recipe(None, {"synthesis.method": "deepinversion"})
    s = r.synthesis
    assert (s.g_steps, s.lr_g, s.bn_mmt, s.reset_l0_after) == (2000, 0.1, 0.0, None)
    r = load_recipe(None, {"synthesis.method": "deepinversion", "synthesis.g_steps": 50, "synthesis.lr_g": 0.25})
    assert (r.synthesis.g_steps, r.synthesis.lr_g) == (50, 0.25)
    shipped = load_recipe(REPO / "recipes" / "cifar-resnet20-deepinversion.yaml")
    assert shipped.synthesis.method == "deepinversion" and shipped.synthesis.g_steps == 2000
    assert shipped.distillation == load_recipe(REPO / "recipes" / "cifar-resnet20.yaml").distillation
    p = tmp_path / "resolved.yaml"          # the resolved dump reloads to the same recipe
    p.write_text(shipped.resolved_yaml())
    assert load_recipe(p) == shipped


def test_prior_precision_and_method_options_are_checked():
    r = load_recipe(None, {"synthesis.priors.tv": 0.2, "synthesis.precision": "fp32", "synthesis.channels_last": False})
    assert r.synthesis.priors.tv == 0.2 and r.synthesis.priors.entropy is None
    assert r.synthesis.precision == "fp32" and r.synthesis.channels_last is False
    with pytest.raises(RecipeError, match=r"synthesis.priors.tv: .*greater than or equal to 0"):
        load_recipe(None, {"synthesis.priors.tv": -1})
    with pytest.raises(RecipeError, match=r"unknown key 'synthesis.priors.bn'"):
        load_recipe(None, {"synthesis.priors.bn": 1})
    with pytest.raises(RecipeError, match=r"synthesis.precision: 'fp16' is not allowed"):
        load_recipe(None, {"synthesis.precision": "fp16"})
    with pytest.raises(RecipeError, match=r"synthesis.method: 'dafl' is not allowed"):
        load_recipe(None, {"synthesis.method": "dafl"})


# -- issue 14.4: alias bombs and error text ------------------------------------------------------

def _alias_bomb(levels: int = 9, width: int = 9) -> str:
    lines = [f"l0: &l0 [{','.join(['x'] * width)}]"]
    for i in range(1, levels):
        lines.append(f"l{i}: &l{i} [{','.join([f'*l{i - 1}'] * width)}]")
    lines.append(f"seed: [{','.join([f'*l{levels - 1}'] * width)}]")
    return "\n".join(lines) + "\n"


def test_a_yaml_alias_bomb_is_refused_before_validation(tmp_path, monkeypatch):
    path = tmp_path / "bomb.yaml"
    path.write_text(_alias_bomb())
    assert path.stat().st_size < 500   # bytes that would expand to 9**9 values

    def never(*args, **kwargs):
        raise AssertionError("validation must not see a bomb")

    monkeypatch.setattr(Recipe, "model_validate", never)
    with pytest.raises(RecipeError, match="expands to more than") as err:
        load_recipe(path)
    assert len(str(err.value)) < 300


def test_a_huge_override_is_refused_too():
    with pytest.raises(RecipeError, match="--set seed"):
        load_recipe(None, {"seed": [[0] * 200] * 200})


def test_error_text_is_capped_whatever_the_value(tmp_path):
    path = tmp_path / "long.yaml"
    path.write_text(yaml.safe_dump({"seed": "x" * 1_000_000, "distillation": {"lr": ["y" * 100_000] * 50},
                                    **{f"extra{i}": "z" * 10_000 for i in range(100)}}))
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    assert len(str(err.value)) <= 2_100 and "seed" in str(err.value)


# -- issue 14.9: values that would run but learn nothing, or never end --------------------------

@pytest.mark.parametrize("key, value, says", [
    ("distillation.warmup", 220, "distillation.warmup (220) must be below distillation.epochs (220)"),
    ("distillation.warmup", 500, "distillation.warmup (500) must be below distillation.epochs (220)"),
    ("distillation.temperature", 1e-30, "greater than or equal to 0.1"),
    ("distillation.temperature", 1e6, "less than or equal to 100"),
    ("distillation.epochs", 10**30, "less than or equal to 100000"),
    ("distillation.kd_steps", 10**12, "less than or equal to 1000000"),
    ("synthesis.g_steps", 10**9, "less than or equal to 100000"),
    ("teacher.input_shape", [1, 0, 0], "every dimension must be in 1..16384"),
])
def test_useless_or_endless_values_are_refused_with_the_allowed_range(key, value, says):
    with pytest.raises(RecipeError) as err:
        load_recipe(None, {key: value})
    assert key in str(err.value) and says in str(err.value)
