"""spikeops.energy.profile: MAC/SOP counts worked out by hand, exact padding, attention rules,
energies, model state and errors."""
import json

import pytest
import torch
from torch import nn

import spikeops
from spikeops.energy import profile
from spikeops.nn import LIF, MaskedConv2d, MultiScaleSpikingAttention, QKTokenAttention, SpikingSelfAttention


class TinyNet(nn.Module):
    """Pixels ``[T*B, 1, 3, 3]`` -> conv1 (2x2, 2 ch) -> LIF -> conv2 (2x2, pad 1, 3 ch) -> flatten -> fc (27 -> 4).

    conv1: channel 0 sums its 2x2 window, channel 1 is minus that (never fires).
    conv2: every weight 0.3, so its output (0.3 x spike counts) is real-valued."""

    def __init__(self, T: int = 2):
        super().__init__()
        self.T = T
        self.conv1 = nn.Conv2d(1, 2, 2, bias=False)
        self.lif = LIF(tau=2.0)
        self.conv2 = nn.Conv2d(2, 3, 2, padding=1, bias=False)
        self.fc = nn.Linear(27, 4)
        with torch.no_grad():
            self.conv1.weight[0].fill_(1.0)
            self.conv1.weight[1].fill_(-1.0)
            self.conv2.weight.fill_(0.3)
        self.spikes = None

    def forward(self, x):
        y = self.conv1(x)                                               # [2, 2, 2, 2]
        self.spikes = self.lif(y.view(self.T, -1, *y.shape[1:])).flatten(0, 1)
        z = self.conv2(self.spikes)                                     # [2, 3, 3, 3]
        return self.fc(z.flatten(1))                                    # [2, 4]


def tiny_input():
    """T=2, B=1. Frame 0: a 2x2 block of 1.5 in the top-left; frame 1: all 0.75."""
    f0 = torch.tensor([[1.5, 1.5, 0.0], [1.5, 1.5, 0.0], [0.0, 0.0, 0.0]])
    f1 = torch.full((3, 3), 0.75)
    return torch.stack([f0, f1]).unsqueeze(1)                           # [2, 1, 3, 3]


# conv1 channel-0 window sums, frame 0: 6, 3, 3, 1.5 -> LIF (v = x/2): 3, 1.5, 1.5, 0.75 -> spikes 1, 1, 1, 0.
# Frame 1: sums all 3 -> the three reset neurons: v = 1.5 fire; the fourth: 0.75 + (3 - 0.75)/2 = 1.875 fires.
# Channel 1 never fires. 7 spikes out of 2*2*2*2 = 16 -> rate 7/16.
SPIKES = 7
CONV1_FLOPS = (2 * 2 * 2 * 2) * (1 * 2 * 2)        # 16 outputs x (C_in 1 x 2x2) = 64 MACs on real pixels
CONV2_FLOPS = (2 * 3 * 3 * 3) * (2 * 2 * 2)        # 54 outputs x (C_in 2 x 2x2) = 432
# conv2 (k=2, pad 1, 2x2 -> 3x3): every input position feeds 2x2 = 4 output positions x 3 channels = 12
CONV2_SOPS = SPIKES * 4 * 3                        # 84 (rate x FLOPs = 7/16 x 432 = 189 would count padded taps)
FC_FLOPS = 2 * 27 * 4                              # 216 MACs: conv2's output (multiples of 0.3) is real-valued


def test_tiny_net_counts_match_hand_arithmetic():
    net = TinyNet().eval()
    report = profile(net, tiny_input())
    assert int(net.spikes.sum()) == SPIKES                             # the LIF arithmetic above
    assert [r.name for r in report.rows] == ["conv1", "conv2", "fc"]
    conv1, conv2, fc = report.rows
    assert (conv1.op, conv1.input, conv1.rate, conv1.flops, conv1.flops_mac, conv1.sops) == \
        ("MAC", "real", None, 64, 64, 0)
    assert (conv2.op, conv2.input, conv2.flops, conv2.flops_mac, conv2.sops) == ("AC", "binary", 432, 0, 84)
    assert conv2.rate == 7 / 16
    assert (fc.op, fc.input, fc.flops, fc.flops_mac, fc.sops) == ("MAC", "real", 216, 216, 0)
    assert (CONV1_FLOPS, CONV2_FLOPS, CONV2_SOPS, FC_FLOPS) == (64, 432, 84, 216)
    assert report.flops_mac == 64 + 216 == 280
    assert report.sops == 84
    assert report.flops == 64 + 432 + 216
    assert report.mac_mj == pytest.approx(280 * 4.6e-12 * 1e3, rel=1e-12)     # 1.288e-6 mJ
    assert report.ac_mj == pytest.approx(84 * 0.9e-12 * 1e3, rel=1e-12)       # 7.56e-8 mJ
    assert report.total_mj == pytest.approx(1.288e-6 + 7.56e-8, rel=1e-12)
    assert conv1.energy_mj == pytest.approx(64 * 4.6e-9, rel=1e-12)
    assert conv2.energy_mj == pytest.approx(84 * 0.9e-9, rel=1e-12)


def test_energies_are_configurable():
    report = profile(TinyNet().eval(), tiny_input(), e_mac=1e-12, e_ac=2e-12)
    assert (report.e_mac, report.e_ac) == (1e-12, 2e-12)
    assert report.mac_mj == pytest.approx(280e-9, rel=1e-12)
    assert report.ac_mj == pytest.approx(168e-9, rel=1e-12)
    assert report.total_mj == pytest.approx(448e-9, rel=1e-12)
    assert report.row("conv2").energy_mj == pytest.approx(168e-9, rel=1e-12)


def one_spike(shape, index):
    x = torch.zeros(shape)
    x[index] = 1.0
    return x


@pytest.mark.parametrize("position, outputs_fed", [((0, 0), 4), ((0, 1), 6), ((1, 1), 9)])
def test_padding_counts_only_the_outputs_a_spike_feeds(position, outputs_fed):
    """3x3 conv, pad 1, on 3x3: a corner spike feeds 2x2 outputs, an edge one 2x3, the centre 3x3; x 2 channels."""
    conv = nn.Conv2d(1, 2, 3, padding=1, bias=False)
    row = profile(conv, one_spike((1, 1, 3, 3), (0, 0, *position))).rows[0]
    assert row.sops == outputs_fed * 2
    assert row.flops == 9 * 2 * 9          # 9 output positions x 2 channels x 9 taps, padded taps included
    assert row.rate == 1 / 9


@pytest.mark.parametrize("position, outputs_fed", [((0, 0), 1), ((0, 1), 2), ((1, 1), 4)])
def test_stride_and_padding_count_exactly(position, outputs_fed):
    """3x3 conv, stride 2, pad 1, on 3x3 -> 2x2 outputs centred on the input corners."""
    conv = nn.Conv2d(1, 1, 3, stride=2, padding=1, bias=False)
    row = profile(conv, one_spike((1, 1, 3, 3), (0, 0, *position))).rows[0]
    assert (row.sops, row.flops) == (outputs_fed, 4 * 9)


def test_circular_padding_feeds_every_tap_and_groups_feed_their_own_outputs():
    circular = nn.Conv2d(1, 1, 3, padding=1, padding_mode="circular", bias=False)
    assert profile(circular, one_spike((1, 1, 3, 3), (0, 0, 0, 0))).sops == 9    # wraps around: all 9 outputs
    grouped = nn.Conv2d(2, 4, 1, groups=2, bias=False)                           # channel 0 -> outputs 0, 1 only
    assert profile(grouped, one_spike((1, 2, 2, 2), (0, 0, 1, 1))).sops == 2
    conv1d = nn.Conv1d(1, 1, 3, padding=1, bias=False)                            # [N, C, L] = [1, 1, 4]
    assert profile(conv1d, torch.tensor([[[1.0, 0.0, 0.0, 1.0]]])).sops == 2 + 2  # each end feeds 2 outputs
    assert profile(conv1d, torch.tensor([[[0.0, 1.0, 1.0, 0.0]]])).sops == 3 + 3


def test_sops_equal_rate_times_flops_when_every_input_feeds_the_same_outputs():
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(2, 3, 6, 6, generator=g) < 0.3).float()
    patches = nn.Conv2d(3, 5, 2, stride=2, bias=False)           # non-overlapping 2x2 patches tile 6x6
    row = profile(patches, x).rows[0]
    assert row.flops == 2 * 5 * 3 * 3 * 3 * 4
    assert row.sops == int(x.sum()) * 5 == round(row.rate * row.flops)
    # overlapping 3x3 taps, no padding: a corner spike feeds 1 output position (x 5 channels), not rate x FLOPs
    corner = profile(nn.Conv2d(3, 5, 3, bias=False), one_spike((2, 3, 6, 6), (0, 0, 0, 0))).rows[0]
    assert (corner.sops, corner.flops) == (5, 4320)
    assert corner.rate * corner.flops == pytest.approx(20.0)      # 1 spike in 2*3*36 = 216 inputs: 4320 / 216
    lin = nn.Linear(6, 7)
    row = profile(lin, x).rows[0]                                 # Linear on [2, 3, 6, 6]: 36 rows of 6
    assert (row.flops, row.sops) == (36 * 6 * 7, int(x.sum()) * 7)


def test_integer_residual_inputs_count_their_sum_times_fan_out():
    x = torch.tensor([[[[0.0, 1.0, 2.0, 3.0], [0.0, 0.0, 1.0, 0.0]]]])    # [T=1, B=1, N=2, C=4], sum 7
    row = profile(nn.Linear(4, 3), x).rows[0]
    assert (row.op, row.input, row.sops, row.flops, row.flops_mac) == ("AC", "int 0..3", 7 * 3, 2 * 4 * 3, 0)
    assert row.rate == 7 / 8


def test_integer_counts_are_additive_over_spike_trains():
    """Counting n as n spikes: profile(x1 + x2) == profile(x1) + profile(x2), padding and stride included."""
    g = torch.Generator().manual_seed(1)
    x1, x2 = ((torch.rand(2, 2, 5, 5, generator=g) < 0.4).float() for _ in range(2))
    conv = nn.Conv2d(2, 3, 3, stride=2, padding=1, bias=False)
    both = profile(conv, x1 + x2).rows[0]
    assert both.input == "int 0..2"
    assert both.sops == profile(conv, x1).sops + profile(conv, x2).sops


def test_large_or_negative_integers_and_fractions_are_real_valued():
    lin = nn.Linear(2, 3)
    assert profile(lin, torch.tensor([[100.0, 0.0]])).rows[0].op == "MAC"            # above max_count=64
    row = profile(lin, torch.tensor([[100.0, 0.0]]), max_count=100).rows[0]
    assert (row.op, row.sops) == ("AC", 300)
    assert profile(lin, torch.tensor([[-1.0, 1.0]])).rows[0].op == "MAC"
    assert profile(lin, torch.tensor([[0.5, 1.0]])).rows[0].op == "MAC"


def test_module_called_twice_sums_both_calls_and_mixes_kinds():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(2, 2)

        def forward(self, x):
            return self.fc(x) + self.fc(torch.ones_like(x) * 0.5)

    row = profile(Twice(), torch.tensor([[1.0, 1.0]])).rows[0]
    assert (row.calls, row.op, row.input, row.sops, row.flops, row.flops_mac) == (2, "MAC+AC", "binary+real", 4, 8, 4)


def test_masked_conv_counts_only_visible_outputs():
    conv = MaskedConv2d(1, 2, 3, padding=1, bias=False)
    x = torch.ones(1, 1, 4, 4)
    # dense: 16 outputs x 2 ch x 9 taps; per axis the 4 inputs feed 2, 3, 3, 2 outputs -> 10 x 10 x 2 channels
    dense = profile(conv, x).rows[0]
    assert (dense.flops, dense.sops) == (288, 200)
    mask = torch.tensor([[[[True, False], [False, False]]]])           # only the top-left 2x2 output block
    with spikeops.nn.masking(mask):
        masked = profile(conv, x).rows[0]
    # 4 visible outputs x 2 x 9; their in-bounds taps: 4 + 6 + 6 + 9 = 25, x 2 channels
    assert (masked.flops, masked.sops) == (72, 50)


def capture_outputs(modules):
    seen = {}
    for key, m in modules.items():
        m.register_forward_hook(lambda _m, _i, out, key=key: seen.__setitem__(key, out.detach().clone()))
    return seen


def test_ssa_products_follow_the_formula_with_observed_rates():
    torch.manual_seed(0)
    attn = SpikingSelfAttention(8, num_heads=2).eval()
    with torch.no_grad():
        for branch in (attn.q, attn.k, attn.v):
            branch.linear.weight.mul_(4.0)                             # enough drive for the neurons to fire
    x = (torch.rand(2, 1, 4, 8, generator=torch.Generator().manual_seed(3)) < 0.5).float()   # [T, B, N, C]
    seen = capture_outputs({"q": attn.q, "k": attn.k, "v": attn.v})
    seen_proj = {}
    attn.proj.linear.register_forward_pre_hook(lambda _m, args: seen_proj.__setitem__("a", args[0].clone()))
    report = profile(attn, x)
    fq, fk, fv = (seen[k].double().mean().item() for k in "qkv")
    assert 0 < fk < 1 and 0 < fv < 1 and 0 < fq < 1 and fk != fv      # the min() and all terms matter
    T, B, N, h, d = 2, 1, 4, 2, 4
    row = report.row("(model)")
    assert row.sops == round(T * B * h * N * d * d * (min(fk, fv) + fq))
    assert row.flops == 2 * T * B * h * N * d * d == 512
    assert row.rates == pytest.approx({"f_q": fq, "f_k": fk, "f_v": fv}, abs=1e-12)
    for name in ("q.linear", "k.linear", "v.linear"):
        assert report.row(name).sops == int(x.sum()) * 8
    assert report.row("proj.linear").sops == int(seen_proj["a"].sum()) * 8
    assert report.sops == sum(r.sops for r in report.rows)


@pytest.mark.parametrize("cls", [QKTokenAttention, MultiScaleSpikingAttention])
def test_token_attention_counts_column_sums_and_mask(cls):
    torch.manual_seed(0)
    block = cls(8, num_heads=2).eval()
    with torch.no_grad():
        for branch in (block.q, block.p):          # enough drive for Q (and P) to fire
            if branch is not None:
                branch.conv.weight.mul_(3.0)
                branch.bn.bias.fill_(1.0)
        block.k.bn.weight.zero_()                  # K = LIF(10) fires at every step: the mask output is A itself
        block.k.bn.bias.fill_(10.0)
    x = (torch.rand(2, 1, 8, 5, generator=torch.Generator().manual_seed(4)) < 0.5).float()   # [T, B, C, N]
    seen = capture_outputs({"q": block.q, "k": block.k, **({"p": block.p} if block.p is not None else {})})
    seen_proj = {}
    block.proj.conv.register_forward_pre_hook(lambda _m, args: seen_proj.__setitem__("a", args[0].clone()))
    row = profile(block, x).row("(model)")
    assert bool((seen["k"] == 1).all())
    masked_sum = int(seen_proj["a"].sum())         # = d x (attention spikes), since K is all ones
    column_sums = int(seen["q"].sum()) + (int(seen["p"].sum()) if block.p is not None else 0)
    assert 0 < masked_sum < seen_proj["a"].numel()
    assert row.sops == column_sums + masked_sum
    numel = 2 * 1 * 8 * 5                          # T B C N
    assert row.flops == numel * (3 if block.p is not None else 2)
    assert row.rates["f_attn"] == pytest.approx(masked_sum / numel, abs=1e-12)
    assert row.rates["f_q"] == pytest.approx(int(seen["q"].sum()) / numel, abs=1e-12)


def test_model_state_is_unchanged():
    torch.manual_seed(0)
    attn = SpikingSelfAttention(8, num_heads=2).train()
    x = (torch.rand(2, 1, 4, 8) < 0.5).float()
    before = {k: v.clone() for k, v in attn.state_dict().items()}
    buffer_ids = {k: id(v) for k, v in attn.named_buffers()}
    profile(attn, x)
    assert attn.training
    assert all(torch.equal(v, before[k]) for k, v in attn.state_dict().items())
    assert {k: id(v) for k, v in attn.named_buffers()} == buffer_ids
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in attn.modules())
    with torch.no_grad():                          # the same run without profile does move the statistics
        attn(x)
    assert not torch.equal(attn.q.bn.running_mean, before["q.bn.running_mean"])


def test_state_is_restored_and_hooks_removed_when_forward_raises():
    class Boom(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn, self.fc = nn.BatchNorm1d(3), nn.Linear(3, 2)

        def forward(self, x):
            self.fc(self.bn(x))
            raise RuntimeError("boom")

    model = Boom().train()
    with pytest.raises(RuntimeError, match="boom"):
        profile(model, torch.randn(4, 3))
    assert torch.equal(model.bn.running_mean, torch.zeros(3)) and int(model.bn.num_batches_tracked) == 0
    assert not model.fc._forward_hooks


def test_report_table_and_dict():
    report = profile(TinyNet().eval(), tiny_input())
    text = str(report)
    assert text == report.table()
    lines = text.splitlines()
    header = lines[0]
    for name, line in zip(["conv1", "conv2", "fc"], lines[2:5]):
        assert line.startswith(name)
        row = report.row(name)
        assert line[header.index("op"):].startswith(row.op)           # columns aligned under the header
        assert line[header.index("input"):].startswith(row.input)
    assert "total: " in text and "280 FLOPs" in text and "84 SOPs" in text
    d = json.loads(json.dumps(report.to_dict()))
    assert [r["name"] for r in d["rows"]] == ["conv1", "conv2", "fc"]
    assert d["totals"]["flops_mac"] == 280 and d["totals"]["sops"] == 84
    assert d["totals"]["total_mj"] == pytest.approx(report.total_mj)
    assert d["rows"][1]["rate"] == 7 / 16


def test_errors_say_what_is_wrong():
    net = TinyNet()
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        profile(net, [[1.0]])
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        profile(lambda x: x, torch.zeros(1))
    with pytest.raises(ValueError, match="e_ac must be a finite energy >= 0"):
        profile(net, tiny_input(), e_ac=-1.0)
    with pytest.raises(TypeError, match="e_mac must be a number"):
        profile(net, tiny_input(), e_mac="4.6pJ")
    with pytest.raises(ValueError, match="max_count must be an integer >= 1"):
        profile(net, tiny_input(), max_count=0)
    with pytest.raises(ValueError, match="no nn.Conv1d/2d/3d, nn.Linear"):
        profile(nn.Sequential(nn.ReLU()), torch.zeros(2))
