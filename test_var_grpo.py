"""Tests for var_grpo.py. Run: python -m pytest -q  (CPU only, offline, a few minutes on 2 cores).

Parity tests compare against golden outputs of the official FoundationVision/VAR code (testdata/var_tiny);
set VAR_GRPO_FIXTURES=dir1:dir2 to run them on other fixture directories of the same format.
"""
import hashlib
import http.server
import json
import math
import os
import threading
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # open_clip must never wait on a hub here

import pytest
import torch

import var_grpo as vg

HERE = Path(__file__).parent
TESTDATA = HERE / "testdata"
FIXTURES = [Path(p) for p in os.environ.get("VAR_GRPO_FIXTURES", str(TESTDATA / "var_tiny")).split(os.pathsep) if p]


# ------------------------------------------------------------------------------------------------
# Official checkpoints: keys, shapes and parameter counts (built on the meta device: instant)
# ------------------------------------------------------------------------------------------------

OFFICIAL_SHAPES = json.loads((TESTDATA / "official_state_dict_shapes.json").read_text())
VAR_PARAMS = {16: 310_283_520, 20: 600_917_136, 24: 1_033_399_360, 30: 2_010_020_356}


def shapes(model):
    return {k: list(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("depth", [16, 20, 24, 30])
def test_var_matches_official_state_dict(depth):
    with torch.device("meta"):
        var = vg.build_var(vg.OFFICIAL_ARCH, depth)
    assert shapes(var) == OFFICIAL_SHAPES[f"var_d{depth}"]
    assert sum(p.numel() for p in var.parameters()) == VAR_PARAMS[depth]


def test_vae_matches_official_state_dict():
    with torch.device("meta"):
        vae = vg.build_vae(vg.OFFICIAL_ARCH)
    assert shapes(vae) == OFFICIAL_SHAPES["vae_ch160v4096z32"]
    n_params = sum(p.numel() for p in vae.parameters())
    assert n_params == 108_948_355
    # the published 108,989,315 also counts the (10, 4096) codebook-usage buffer ema_vocab_hit_SV
    assert n_params + vae.quantize.ema_vocab_hit_SV.numel() == 108_989_315


# ------------------------------------------------------------------------------------------------
# Parity with the official implementation, for every fixture directory
# ------------------------------------------------------------------------------------------------

def load_fixture(d: Path):
    c = json.loads((d / "config.json").read_text())
    with torch.device("meta"):
        vae = vg.VQVAE(c["vocab_size"], c["z_channels"], c["ch"], c["patch_nums"], c["quant_resi"], c["share_quant_resi"])
        var = vg.VAR(c["depth"], c["embed_dim"], c["num_heads"], c["vocab_size"], c["z_channels"], c["patch_nums"],
                     c["num_classes"], c["attn_l2_norm"], c["shared_aln"], c["norm_eps"], c["mlp_ratio"])
    vg.load_weights(vae, d / "vae.pth")
    vg.load_weights(var, d / "var.pth")
    return c, vae, var.eval(), torch.load(d / "expected.pt", weights_only=True)


@pytest.fixture(scope="module", params=FIXTURES, ids=lambda p: p.name)
def fixture(request):
    return load_fixture(request.param)


@torch.no_grad()
def test_parity_tokens_and_reconstruction(fixture):
    c, vae, var, e = fixture
    assert e["image"].shape[-1] == c["image_size"]
    tokens = vae.img_to_tokens(e["image"])
    assert [t.shape for t in tokens] == [(c["batch"], pn * pn) for pn in c["patch_nums"]]
    for mine, official in zip(tokens, e["tokens"]):
        assert torch.equal(mine, official)
    torch.testing.assert_close(vae.tokens_to_img(e["tokens"]), e["reconstruction"], atol=1e-4, rtol=0)


@torch.no_grad()
def test_parity_teacher_forced_logits(fixture):
    c, vae, var, e = fixture
    x_BLCv = vae.quantize.tokens_to_var_input(e["tokens"])
    torch.testing.assert_close(x_BLCv, e["teacher_forcing_input"], atol=1e-5, rtol=0)
    torch.testing.assert_close(var(e["labels"], x_BLCv), e["logits"], atol=1e-4, rtol=0)
    null_B = torch.full_like(e["labels"], c["num_classes"])
    torch.testing.assert_close(var(null_B, x_BLCv), e["logits_uncond"], atol=1e-4, rtol=0)


@torch.no_grad()
def test_parity_greedy_cfg_sampling(fixture):
    c, vae, var, e = fixture
    for cfg in c["greedy_cfgs"]:
        s = vg.sample(var, vae, e["labels"], cfg=cfg, top_k=1)
        official = e[f"greedy_cfg{cfg}_tokens"]
        assert len(s.tokens) == len(official)
        for si, (mine, theirs) in enumerate(zip(s.tokens, official)):
            assert torch.equal(mine, theirs), f"cfg={cfg}: tokens differ at scale {si}"
        torch.testing.assert_close(s.image, e[f"greedy_cfg{cfg}_image"], atol=1e-4, rtol=0)


# ------------------------------------------------------------------------------------------------
# Sampler
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return vg.build_vae(vg.TINY_ARCH), vg.build_var(vg.TINY_ARCH, vg.TINY_DEPTH).eval()


def test_filter_top_k_top_p_by_hand():
    logits = torch.tensor([[[0.0, 1.0, 2.0, 3.0]]]).log_softmax(-1)  # probs ~ .032 .087 .237 .644
    inf = -torch.inf
    assert torch.isinf(vg.filter_top_k_top_p(logits, top_k=2))[0, 0].tolist() == [True, True, False, False]
    # top-p 0.8: .644 alone is not enough, .644 + .237 is -> keep the two most likely
    assert torch.isinf(vg.filter_top_k_top_p(logits, top_p=0.8))[0, 0].tolist() == [True, True, False, False]
    assert torch.isinf(vg.filter_top_k_top_p(logits, top_p=0.5))[0, 0].tolist() == [True, True, True, False]
    assert not torch.isinf(vg.filter_top_k_top_p(logits)).any()
    assert vg.filter_top_k_top_p(logits, top_k=1)[0, 0, 3] != inf


def test_sampler_generator_reproducible_and_logprobs(tiny):
    vae, var = tiny
    labels = torch.tensor([0, 3])
    kw = dict(cfg=2.0, temperature=0.7, top_k=50, top_p=0.9, return_logprobs=True)
    a = vg.sample(var, vae, labels, generator=torch.Generator().manual_seed(1), **kw)
    b = vg.sample(var, vae, labels, generator=torch.Generator().manual_seed(1), **kw)
    c = vg.sample(var, vae, labels, generator=torch.Generator().manual_seed(2), **kw)
    assert all(torch.equal(x, y) for x, y in zip(a.tokens, b.tokens))
    assert not all(torch.equal(x, y) for x, y in zip(a.tokens, c.tokens))
    assert a.image.shape == (2, 3, 64, 64) and 0 <= a.image.min() and a.image.max() <= 1
    assert a.logprob.shape == (2, var.L) and (a.logprob <= 0).all() and torch.isfinite(a.logprob).all()
    greedy = vg.sample(var, vae, labels, top_k=1, return_logprobs=True)
    assert torch.equal(greedy.logprob, torch.zeros(2, var.L))  # a one-hot distribution


def test_kv_cached_sampler_matches_teacher_forcing(tiny):
    """Without guidance, the sampler's per-scale logits are the teacher-forced logits of the tokens it drew."""
    vae, var = tiny
    labels = torch.tensor([1, 2])
    s = vg.sample(var, vae, labels, cfg=0.0, generator=torch.Generator().manual_seed(0), return_logprobs=True)
    with torch.no_grad():
        logits_BLV = var(labels, vae.quantize.tokens_to_var_input(s.tokens))
    tokens_BL = torch.cat(s.tokens, dim=1)
    tf_logprob = logits_BLV.log_softmax(-1).gather(-1, tokens_BL.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(tf_logprob, s.logprob, atol=1e-4, rtol=0)


def test_benchmark_entry_point_runs(capsys):
    result = vg.benchmark(vg.Config(tiny=True, device="cpu", bench_batch=2), repeats=1)
    assert result["sample_images_per_s"] > 0 and result["teacher_forced_tokens_per_s"] > 0
    assert "sample_images_per_s" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------
# Config and command line
# ------------------------------------------------------------------------------------------------

def test_every_config_field_has_a_help_line():
    helps = vg.field_help()
    for f in vg.fields(vg.Config):
        assert helps.get(f.name, "").strip(), f"Config.{f.name} has no docstring"


def test_command_line_is_derived_from_config():
    cfg = vg.parse_config(["--depth", "20", "--tiny", "--cfg", "3.5", "--var-ckpt", "x.pth"])
    assert (cfg.depth, cfg.tiny, cfg.cfg, cfg.var_ckpt) == (20, True, 3.5, "x.pth")
    assert vg.parse_config([]) == vg.Config()


# ------------------------------------------------------------------------------------------------
# Downloads, against a real HTTP server on 127.0.0.1
# ------------------------------------------------------------------------------------------------

PAYLOAD = os.urandom(300_000)
PAYLOAD_SHA = hashlib.sha256(PAYLOAD).hexdigest()


class FileServer(http.server.BaseHTTPRequestHandler):
    """Serves PAYLOAD at /file.pth with Hugging Face's sha256 ETag; honours Range. `mode` injects faults:
    'cut' closes the first response half-way, 'corrupt' serves wrong bytes, anything else at /missing is a 404."""
    mode = "ok"
    ranges: list = []

    def log_message(self, *args):
        pass

    def do_GET(self):
        if self.path != "/file.pth":
            self.send_error(404)
            return
        rng = self.headers.get("Range")
        FileServer.ranges.append(rng)
        start = int(rng.split("=")[1].split("-")[0]) if rng else 0
        body = PAYLOAD if FileServer.mode != "corrupt" else bytes(len(PAYLOAD))
        self.send_response(206 if rng else 200)
        self.send_header("ETag", f'"{PAYLOAD_SHA}"')
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        if FileServer.mode == "cut":
            FileServer.mode = "ok"  # only the first response is cut
            self.wfile.write(body[start:start + 100_000])
            self.wfile.flush()
            self.connection.shutdown(2)
            return
        self.wfile.write(body[start:])


@pytest.fixture()
def server():
    FileServer.mode, FileServer.ranges = "ok", []
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FileServer)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_download_complete_file(server, tmp_path):
    dest = vg.download(f"{server}/file.pth", tmp_path / "w.pth")
    assert dest.read_bytes() == PAYLOAD and not (tmp_path / "w.pth.part").exists()
    assert vg.download(f"{server}/file.pth", dest) == dest and len(FileServer.ranges) == 1  # cached: no request


def test_interrupted_download_resumes_with_range(server, tmp_path):
    FileServer.mode = "cut"
    dest = vg.download(f"{server}/file.pth", tmp_path / "w.pth")
    assert dest.read_bytes() == PAYLOAD
    first, second = FileServer.ranges
    resumed_at = int(second.removeprefix("bytes=").rstrip("-"))
    assert first is None and 0 < resumed_at <= 100_000  # kept what arrived before the cut


def test_partial_file_from_an_earlier_run_is_resumed(server, tmp_path):
    (tmp_path / "w.pth.part").write_bytes(PAYLOAD[:123_456])
    assert vg.download(f"{server}/file.pth", tmp_path / "w.pth").read_bytes() == PAYLOAD
    assert FileServer.ranges == ["bytes=123456-"]


def test_corrupt_download_is_rejected_and_never_cached(server, tmp_path):
    FileServer.mode = "corrupt"
    with pytest.raises(vg.WeightsError, match="sha256"):
        vg.download(f"{server}/file.pth", tmp_path / "w.pth")
    assert list(tmp_path.iterdir()) == []


def test_404_names_the_url_and_the_manual_route(server, tmp_path):
    with pytest.raises(vg.WeightsError) as err:
        vg.download(f"{server}/missing.pth", tmp_path / "w.pth")
    assert f"{server}/missing.pth" in str(err.value) and "404" in str(err.value) and "by hand" in str(err.value)
    assert not (tmp_path / "w.pth").exists()


def test_local_checkpoint_paths_need_no_network(tmp_path):
    c, vae, var, _ = load_fixture(TESTDATA / "var_tiny")
    cfg = vg.Config(vae_ckpt=str(TESTDATA / "var_tiny/vae.pth"), cache_dir=str(tmp_path))
    assert vg.weight_path(cfg.vae_ckpt, "http://127.0.0.1:9/never", cfg) == Path(cfg.vae_ckpt)
    with pytest.raises(vg.WeightsError, match="does not exist"):
        vg.weight_path(str(tmp_path / "nope.pth"), "http://127.0.0.1:9/never", cfg)


# ------------------------------------------------------------------------------------------------
# Clear errors for bad checkpoints
# ------------------------------------------------------------------------------------------------

def meta_var(depth):
    with torch.device("meta"):
        return vg.build_var(vg.TINY_ARCH, depth)


def test_checkpoint_of_another_depth(tmp_path):
    torch.save(vg.build_var(vg.TINY_ARCH, 3).state_dict(), tmp_path / "d3.pth")
    with pytest.raises(vg.WeightsError, match=r"looks like VAR-d3 \(width 192\) but depth 2 was asked"):
        vg.load_weights(meta_var(2), tmp_path / "d3.pth")


def test_file_that_is_not_a_checkpoint(tmp_path):
    (tmp_path / "junk.pth").write_bytes(b"<html>rate limited</html>")
    with pytest.raises(vg.WeightsError, match="not a PyTorch checkpoint"):
        vg.load_weights(meta_var(2), tmp_path / "junk.pth")
    torch.save({"model": {"w": torch.zeros(1)}, "step": 3}, tmp_path / "nested.pth")
    with pytest.raises(vg.WeightsError, match="not a plain state_dict"):
        vg.load_weights(meta_var(2), tmp_path / "nested.pth")


def test_missing_and_unexpected_keys_are_named(tmp_path):
    sd = vg.build_var(vg.TINY_ARCH, 2).state_dict()
    del sd["head.bias"]
    sd["blocks.7.extra"] = torch.zeros(1)
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(vg.WeightsError, match=r"missing keys \['head.bias'\].*unexpected keys \['blocks.7.extra'\]"):
        vg.load_weights(meta_var(2), tmp_path / "bad.pth")
