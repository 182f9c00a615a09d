import json

import torch

from lowbit.eval.outliers import activation_outliers


def test_outlier_statistics_on_a_planted_dimension(tiny):
    model, tok = tiny
    with torch.no_grad():
        for layer in model.model.layers:  # dimension 5 of every normed input gets large
            layer.input_layernorm.weight[5] = 500.0
            layer.post_attention_layernorm.weight[5] = 500.0
    ids = torch.randint(0, 320, (3, 40), generator=torch.Generator().manual_seed(0))
    res = activation_outliers(model, ids, threshold=6.0, progress=False)
    assert res["tokens"] == 120
    q = next(l for l in res["layers"] if l["name"] == "model.layers.0.self_attn.q_proj")
    assert q["outlier_dims"][0]["dim"] == 5 and q["outlier_dims"][0]["share"] > 0.9
    assert q["max_abs"] > 100 and q["ratio"] > 50
    assert any(f["dim"] == 5 and f["width"] == 72 and f["layers_frac"] >= 0.25 and f["emergent"] for f in res["features"])
    feat = next(f for f in res["features"] if f["dim"] == 5)
    assert len(feat["shares"]) == len(res["layers"])


def test_cli_inspect_activations_writes_a_png(cli, tiny_dir, tmp_path, text_file):
    png = tmp_path / "plots" / "act.png"
    code, stdout, err = cli("inspect", tiny_dir, "--activations", "--calib", text_file, "--nsamples", "2",
                            "--calib-seqlen", "32", "--plot", png, "--json")
    assert code == 0, err
    res = json.loads(stdout.splitlines()[-1])
    assert len(res["layers"]) == 15  # 14 block linears + lm_head
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    code, stdout, err = cli("inspect", tiny_dir, "--activations", "--calib", text_file, "--nsamples", "2",
                            "--calib-seqlen", "32")
    assert code == 0 and "max|x|" in stdout and "model.layers.1.mlp.down_proj" in stdout


def test_cli_inspect_activations_refuses_a_bad_plot_path(cli, tiny_dir, tmp_path):
    code, stdout, err = cli("inspect", tiny_dir, "--activations", "--plot", tmp_path)
    assert code == 2 and "png" in err
