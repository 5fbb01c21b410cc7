import pytest

from scanner.config import ConfigError, load_config

DEMO = "configs/demo.yaml"


def test_demo_config_loads_with_every_section():
    cfg = load_config(DEMO, ["model.path=/m"])
    assert cfg.geometry.jvp == "vjp" and cfg.classify.detector == "loss_cal" and cfg.model.path == "/m"


def test_unknown_key_names_key_and_closest(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("geometry:\n  probs: 4\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'geometry.probs'.*did you mean 'probes'"):
        load_config(p)


def test_unknown_section(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("geometri:\n  probes: 4\n")
    with pytest.raises(ConfigError, match="'geometri'.*'geometry'"):
        load_config(p)


@pytest.mark.parametrize("override, message", [
    ("geometry.t0=1.5", r"geometry.t0 must be a float in \(0, 1\), got 1.5"),
    ("geometry.probes=0", r"geometry.probes must be an int >= 1, got 0"),
    ("geometry.trace=magic", r"geometry.trace must be one of 'exact', 'hutchinson', got 'magic'"),
    ("geometry.probes=four", r"geometry.probes must be an int, got 'four'"),
    ("data.channels=2", r"data.channels must be 1 or 3, got 2"),
    ("geometry.p_values=[1, -2]", r"geometry.p_values must be a non-empty list of numbers > 0"),
    ("neighbours.dup_threshold=1.5", r"neighbours.dup_threshold must be a cosine in \[-1, 1\]"),
    ("model.kind=pixel", r"model.path must be a local model directory"),
    ("classify.calibration_fpr=0.7", r"classify.calibration_fpr must be a float in \(0, 0.5\)"),
    ("classify.calibration_max_images=10", r"classify.calibration_max_images must be an int >= 100, got 10"),
    ("classify.calibration_members=maybe", r"classify.calibration_members must be .*true or false, got .maybe."),
])
def test_bad_values_name_value_and_accepted(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(DEMO, ["model.path=/m", override] if "model.kind" not in override else [override])


def test_set_override_parses_yaml_scalars():
    cfg = load_config(DEMO, ["model.path=/m", "geometry.p_values=[1.5, 2]", "geometry.nb=true", "ray.num_cpus=2"])
    assert cfg.geometry.p_values == [1.5, 2.0] and cfg.geometry.nb is True and cfg.ray.num_cpus == 2


def test_set_without_equals_fails():
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(DEMO, ["geometry.t0"])


def test_python_object_tag_is_refused(tmp_path):
    p = tmp_path / "evil.yaml"
    p.write_text("seed: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="unsafe or unknown YAML tag"):
        load_config(p)


def test_missing_file():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("nope.yaml")


@pytest.mark.parametrize("name", ["demo", "demo.yaml", "laion-sd15"])
def test_bare_name_is_a_shipped_config(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # away from the checkout's configs/: the name alone finds the installed file
    cfg = load_config(name, ["model.path=/m"])
    assert cfg.model.path == "/m"


def test_existing_path_wins_over_a_shipped_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "demo").write_text("seed: 7\nmodel:\n  kind: none\n")
    assert load_config("demo").seed == 7


def test_unknown_name_lists_shipped_configs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"'nosuch' does not exist; .*shipped with memscan: demo, demo-latent, laion-sd15"):
        load_config("nosuch")
    with pytest.raises(ConfigError, match="does not exist"):  # a path is never replaced by a shipped name
        load_config("elsewhere/demo.yaml")


def test_calibration_shards_need_a_model():
    with pytest.raises(ConfigError, match="classify.calibration_shards is set but model.kind is none"):
        load_config(DEMO, ["model.kind=none", "classify.calibration_shards=/h"])


def test_part_manifest_ignores_the_corpus_step_settings_and_refuses_a_stage_change(tmp_path):
    """LID_* settings (local PCA) are read only by the corpus steps: changing them reuses the parts; a geometry key
    the scoring stage reads does not; a manifest written when the lpca keys were still in it is accepted."""
    import json

    from scanner.pipeline import check_manifest, run_manifest
    from scanner.storage import Out

    base = ["model.kind=pixel", "model.path=/m"]
    (tmp_path / "parts").mkdir()
    (tmp_path / "parts" / "00000.parquet").write_bytes(b"")
    check_manifest(Out(tmp_path), run_manifest(load_config(None, base), None))
    old = json.loads((tmp_path / "parts" / "_run.json").read_text())
    assert "lpca_k" not in old["geometry"] and "t0" in old["geometry"]
    check_manifest(Out(tmp_path), run_manifest(load_config(None, [*base, "geometry.lpca_k=7", "geometry.lpca_scale=local",
                                                             "geometry.lpca_alpha=0.1"]), None))
    with pytest.raises(ConfigError, match=r"part files made with another geometry"):
        check_manifest(Out(tmp_path), run_manifest(load_config(None, [*base, "geometry.t0=0.2"]), None))
    old["geometry"].update(lpca_k=20, lpca_alpha=0.05, lpca_space="model")  # as older memscan wrote it
    (tmp_path / "parts" / "_run.json").write_text(json.dumps(old))
    check_manifest(Out(tmp_path), run_manifest(load_config(None, base), None))


def test_bad_lpca_scale_names_the_key_and_the_choices():
    with pytest.raises(ConfigError, match=r"geometry.lpca_scale must be one of 'corpus', 'local', got 'global'"):
        load_config(None, ["geometry.lpca_scale=global"])
