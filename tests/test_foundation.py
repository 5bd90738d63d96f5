import subprocess
import sys

import torch

import relinear


def test_version_matches_installed_metadata():
    import importlib.metadata

    assert relinear.__version__ == importlib.metadata.version("relinear")


def test_backend_is_registered_through_the_entry_point():
    from importlib.metadata import entry_points

    (ep,) = [e for e in entry_points(group="torch_dynamo_backends") if e.name == "relinear"]
    from relinear.backend import relinear_backend

    assert ep.load() is relinear_backend
    assert "relinear" in torch._dynamo.list_backends()


def test_compile_with_backend_name_runs():
    torch._dynamo.reset()
    lin = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU())
    x = torch.randn(2, 8)
    out = torch.compile(lin, backend="relinear")(x)
    torch.testing.assert_close(out, lin(x))


def test_cli_version_and_bad_arguments():
    ok = subprocess.run([sys.executable, "-m", "relinear.cli", "--version"], capture_output=True, text=True)
    assert ok.returncode == 0 and ok.stdout.strip() == f"relinear {relinear.__version__}"
    bad = subprocess.run([sys.executable, "-m", "relinear.cli", "frobnicate"], capture_output=True, text=True)
    assert bad.returncode == 2
    assert len(bad.stderr.strip().splitlines()) == 1 and "frobnicate" in bad.stderr


def test_minilm_loads_offline_and_embeds(minilm):
    from relinear.demo import SENTENCES, encode, mean_pool

    model, tokenizer = minilm
    ids, mask = encode(tokenizer)
    with torch.no_grad():
        emb = mean_pool(model(ids, mask).last_hidden_state, mask)
    assert emb.shape == (len(SENTENCES), 384)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(len(SENTENCES)))
    # a real model, not random weights: paraphrase-free sentences are far from identical yet not orthogonal noise
    sims = emb @ emb.T
    assert sims.diagonal().allclose(torch.ones(len(SENTENCES)))
    assert 0.0 < sims[0, 1] < 0.9


def test_candidates_in_minilm_graph(minilm):
    from relinear.demo import encode
    from relinear.rewrite.detect import count_candidates, find_candidates

    model, tokenizer = minilm
    gm = torch.export.export(model, encode(tokenizer), strict=False).module()
    assert count_candidates(find_candidates(gm)) == {"attention": 6, "dense": 37, "activation": 6}
