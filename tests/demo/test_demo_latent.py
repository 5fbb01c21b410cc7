"""The latent demo: a caption-unique corpus, a locally written CLIP tokenizer, and a tiny text-to-image Stable
Diffusion trained here that loads both as a diffusers StableDiffusionPipeline and as memscan's latent model."""

import io
import json
import tarfile

import numpy as np
import pandas as pd
import pytest
import torch

from scanner.demo.corpus import build_demo_corpus
from scanner.demo.latent import MAX_TOKENS, RESOLUTION, train_latent_demo, write_tokenizer

SMALL = {"n_unique": 40, "n_repeated": 4, "repeat_copies": 6, "n_oversampled": 2, "n_exact_dup_groups": 1,
         "n_near_dup_groups": 1, "n_corrupt": 1, "n_no_caption": 2, "samples_per_shard": 40, "seed": 2}


def members(corpus) -> dict[str, dict[str, bytes]]:
    """key -> {ext: bytes} over every shard (the truncated tail left out)."""
    out: dict[str, dict[str, bytes]] = {}
    for shard in corpus.shards:
        with tarfile.open(shard) as tf:
            try:
                for m in tf:
                    key, ext = m.name.split(".", 1)
                    out.setdefault(key, {})[ext] = tf.extractfile(m).read()
            except (tarfile.ReadError, OSError):
                pass
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return build_demo_corpus(tmp_path_factory.mktemp("latent-corpus"), captions="unique", **SMALL)


@pytest.fixture(scope="module")
def model_dir(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("latent-model") / "model"
    return train_latent_demo(corpus.out_dir, out, steps=6, vae_steps=6, batch_size=16, progress=False,
                             num_threads=1)


def test_unique_captions_keep_the_images_and_plant_verbatim_and_varied_groups(corpus, tmp_path):
    template = build_demo_corpus(tmp_path / "template", **SMALL)
    uniq, tmpl = members(corpus), members(template)
    assert uniq.keys() == tmpl.keys()
    assert all(uniq[k].get("jpg") == tmpl[k].get("jpg") for k in uniq)  # same images, other captions
    truth = pd.read_parquet(corpus.truth)
    caption = {k: m["txt"].decode() for k, m in uniq.items() if "txt" in m}
    truth = truth[truth["key"].isin(caption)].assign(caption=lambda d: d["key"].map(caption))
    rep = truth[truth["planted"] == "repeated"]
    assert set(rep["caption_kind"]) == {"verbatim", "varied"}
    per_group = rep.groupby("group_id").agg(kind=("caption_kind", "first"), captions=("caption", "nunique"),
                                           copies=("key", "size"))
    assert (per_group.loc[per_group["kind"] == "verbatim", "captions"] == 1).all()
    varied = per_group[per_group["kind"] == "varied"]
    assert (varied["captions"] == varied["copies"]).all()
    others = truth[truth["planted"] != "repeated"]
    assert others["caption_kind"].isna().all()
    singles = others[others["planted"].isin(["unique", "oversampled"])]["caption"]
    assert singles.is_unique  # a caption names one image, as LAION's mostly do
    assert pd.read_parquet(template.truth)["caption_kind"].isna().all()
    with pytest.raises(ValueError, match="captions must be one of"):
        build_demo_corpus(tmp_path / "bad", captions="random", **SMALL)


def test_tokenizer_makes_each_training_word_one_token_and_never_unknown(tmp_path):
    from transformers import CLIPTokenizer

    texts = ["a handwritten digit 7, misty library 903", "handwritten digits and a library", "ab ba aab"]
    tok = CLIPTokenizer.from_pretrained(write_tokenizer(tmp_path / "tok", texts))
    assert tok.tokenize("a handwritten digit 7, misty library 903") == [
        "a</w>", "handwritten</w>", "digit</w>", "7</w>", ",</w>", "misty</w>", "library</w>", "9</w>", "0</w>",
        "3</w>"]
    assert [len(tok.tokenize(w)) for w in ("handwritten", "digits", "aab", "ba")] == [1, 1, 1, 1]
    unseen = tok("zebra quokka").input_ids
    assert tok.unk_token_id not in unseen[1:-1] and len(unseen) > 4  # pieces and letters, no unknown token
    ids = tok([""], padding="max_length", max_length=MAX_TOKENS).input_ids[0]
    assert ids[:2] == [tok.bos_token_id, tok.eos_token_id] and len(ids) == MAX_TOKENS
    again = write_tokenizer(tmp_path / "tok2", list(reversed(texts)))
    assert (again / "merges.txt").read_text() == (tmp_path / "tok" / "merges.txt").read_text()


def test_saved_model_generates_with_stable_diffusion_pipeline(model_dir):
    from diffusers import StableDiffusionPipeline

    for name in ("vae", "unet", "text_encoder"):
        assert (model_dir / name / "config.json").is_file() and any((model_dir / name).glob("*.safetensors"))
    pipe = StableDiffusionPipeline.from_pretrained(model_dir, use_safetensors=True, safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(["a photo crop of a cat, red river 101"], num_inference_steps=3, guidance_scale=7.5,
               generator=torch.Generator().manual_seed(0), output_type="np")
    img = np.asarray(out.images)
    assert img.shape == (1, RESOLUTION, RESOLUTION, 3) and np.isfinite(img).all()
    assert 0 <= img.min() <= img.max() <= 1 and img.std() > 0


def test_saved_model_loads_as_memscan_latent_model(model_dir, corpus):
    from scanner.config import ModelConfig
    from scanner.demo.train import load_images
    from scanner.models.loading import load_score_model

    model = load_score_model(ModelConfig(kind="latent", path=str(model_dir), device="cpu"))
    assert model.sample_shape == (4, RESOLUTION // 4, RESOLUTION // 4) and model.resolution == RESOLUTION
    data = load_images(corpus.out_dir, RESOLUTION, 3)
    x = model.encode_images(torch.from_numpy(data.images))
    # scaling_factor = 1 / std of the corpus latents (SD chose 0.18215 the same way)
    assert abs(float(x.std()) - 1.0) < 1e-3
    cond = model.encode_text(data.captions[:3])
    assert cond.shape == (3, MAX_TOKENS, model.text_encoder.config.hidden_size)
    info = json.loads((model_dir / "train_info.json").read_text())
    assert info["kind"] == "latent" and info["steps"] == 6 and info["captions_truncated"] == 0
    assert np.isfinite(model.eps(x[:2], torch.tensor([0.5, 0.5]), cond[:2]).numpy()).all()


def test_same_seed_same_model(model_dir, corpus, tmp_path):
    from safetensors.torch import load_file

    again = train_latent_demo(corpus.out_dir, tmp_path / "again", steps=6, vae_steps=6, batch_size=16,
                              progress=False, num_threads=1)
    for name in ("vae", "unet", "text_encoder"):
        a, b = (load_file(next((d / name).glob("*.safetensors"))) for d in (model_dir, again))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert (model_dir / "tokenizer" / "vocab.json").read_text() == (again / "tokenizer" / "vocab.json").read_text()


def test_bad_arguments_and_a_cached_model_of_another_kind(corpus, model_dir, tmp_path):
    from scanner.demo.run import ensure_demo_model

    with pytest.raises(ValueError, match="vae_steps must be an int >= 1"):
        train_latent_demo(corpus.out_dir, tmp_path / "m", vae_steps=0)
    with pytest.raises(ValueError, match="caption_dropout"):
        train_latent_demo(corpus.out_dir, tmp_path / "m", caption_dropout=1.0)
    with pytest.raises(ValueError, match="demo model must be one of"):
        ensure_demo_model(tmp_path / "x", kind="video")
    # a demo directory whose corpus has template captions is refused for the latent model, and the reverse
    import shutil

    shutil.copytree(corpus.out_dir, tmp_path / "d" / "corpus")
    with pytest.raises(ValueError, match="captions"):
        ensure_demo_model(tmp_path / "d", kind="pixel")
    shutil.copytree(model_dir, tmp_path / "d" / "model")
    assert ensure_demo_model(tmp_path / "d", kind="latent", seed=2) == tmp_path / "d" / "model"  # cached
    info = json.loads((tmp_path / "d" / "model" / "train_info.json").read_text())
    (tmp_path / "d" / "model" / "train_info.json").write_text(json.dumps(info | {"kind": "pixel"}))
    with pytest.raises(ValueError, match="holds a pixel demo model, not latent"):
        ensure_demo_model(tmp_path / "d", kind="latent", seed=2)


def test_tar_members_hold_the_captions_the_model_trained_on(corpus, model_dir):
    from scanner.demo.train import load_images

    data = load_images(corpus.out_dir, RESOLUTION, 3)
    got = members(corpus)
    for key, cap in zip(data.keys, data.captions):
        txt = got[key].get("txt")
        assert cap == (txt.decode() if txt is not None else None)
        meta = json.load(io.BytesIO(got[key]["json"]))
        assert meta["caption"] == cap
