"""Trajectory-matching core: Eqs. 2 and 3 by hand, the unroll modes against each other and
against finite differences (float64), the student's inputs."""

import pytest
import torch

from nacd.chat import TokenizedExample
from nacd.config import LoraConfig, ModelConfig
from nacd.errors import NacdError
from nacd.lora import add_lora, init_lora, lora_parameters
from nacd.models import load_model
from nacd.student import Student
from nacd.tm import (
    check_prompt_offset,
    initial_prompts,
    matching_loss,
    nearest_rows,
    nearest_vocab,
    prompted_inputs,
    regularizer,
    snap,
    straight_through,
)
from nacd.unrolls import fd_relative_error, fd_step, unroll

# ---------------------------------------------------------------- Eq. 2 and Eq. 3


def test_matching_loss_by_hand():
    theta_n = [torch.tensor([1.0, 2.0]), torch.tensor([[0.5]])]
    target = [torch.tensor([0.0, 2.0]), torch.tensor([[1.5]])]
    start = [torch.tensor([3.0, 0.0]), torch.tensor([[1.5]])]
    # numerator (1^2 + 0 + 1^2) = 2; denominator (3^2 + 2^2 + 0) = 13
    assert matching_loss(theta_n, target, start).item() == pytest.approx(2 / 13)


def test_nearest_vocab_and_regularizer_by_hand():
    vocab = torch.tensor([[0.0, 0.0], [3.0, 4.0], [10.0, 0.0], [-1.0, 0.0]])
    p = torch.tensor([[3.0, 0.0], [2.9, 4.1], [-0.4, 0.0]], requires_grad=True)
    for chunk in (1, 2, 3, 100):  # chunked search gives the same answer
        dist, idx = nearest_vocab(p, vocab, chunk=chunk)
        assert idx.tolist() == [1, 1, 0] or idx.tolist()[1:] == [1, 0]
    dist, idx = nearest_vocab(p, vocab, chunk=2)
    # (3,0): to (0,0) 3, to (3,4) 4 -> row 0, dist 3; (2.9,4.1) -> row 1, dist sqrt(0.02); (-0.4,0) -> row 0, 0.4
    assert idx.tolist() == [0, 1, 0]
    torch.testing.assert_close(dist, torch.tensor([3.0, 0.02**0.5, 0.4]))
    reg = regularizer(p, vocab, chunk=3)
    assert reg.item() == pytest.approx((3.0 + 0.02**0.5 + 0.4) / 3)
    reg.backward()
    # d/dp mean ||p - e|| = (p - e) / ||p - e|| / n
    expected = torch.tensor([[1.0, 0.0], [-0.1, 0.1], [-1.0, 0.0]])
    expected[1] /= 0.02**0.5
    torch.testing.assert_close(p.grad, expected / 3)


def test_projection_metrics_and_the_straight_through_gradient_by_hand():
    """PEZ's projection: cosine and euclidean pick different rows where a vector is long; the forward
    value is the picked row, the gradient reaches the continuous copy unchanged, and rows the draw does
    not use are left as they are."""
    vocab = torch.tensor([[1.0, 0.0], [10.0, 1.0], [0.0, -2.0]])
    v = torch.tensor([[3.0, 0.3], [0.1, -1.5]])
    # (3, 0.3): euclidean 2.02 to row 0, 7.03 to row 1; cosine 1.0 with row 1 (the same direction)
    for chunk in (1, 2, 8):
        assert nearest_rows(v, vocab, "l2", chunk).tolist() == [0, 2]
        assert nearest_rows(v, vocab, "cosine", chunk).tolist() == [1, 2]
    torch.testing.assert_close(snap(v, vocab, "cosine"), vocab[[1, 2]])
    with pytest.raises(NacdError, match="distill.projection='dot'"):
        nearest_rows(v, vocab, "dot")
    syn = torch.nn.Parameter(torch.tensor([[[3.0, 0.3]], [[0.1, -1.5]], [[9.0, 0.0]]]))  # (n=3, k=1, d=2)
    out = straight_through(syn, vocab, torch.tensor([0, 1]), "cosine")
    torch.testing.assert_close(out.detach(), torch.tensor([[[10.0, 1.0]], [[0.0, -2.0]], [[9.0, 0.0]]]))
    weights = torch.arange(6.0).reshape(3, 1, 2)
    (out * weights).sum().backward()
    torch.testing.assert_close(syn.grad, weights)


def test_swap_candidates_are_the_lowest_first_order_changes_by_hand():
    from nacd.swap import top_candidates

    vocab = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 5.0], [-3.0, 1.0], [2.0, 2.0]])
    grad = torch.tensor([[1.0, 0.0], [0.0, -1.0]])
    current = torch.tensor([[1.0, 0.0], [2.0, 2.0]])
    # position 0: g.e_v - g.e_cur = [0, -2, -1, -4, 1] -> rows 3, 1; position 1: [0, 0, -5, -1, -2] + 2 -> 2, 4
    for chunk in (1, 2, 3, 8):
        assert top_candidates(grad, current, vocab, 2, chunk).tolist() == [[3, 1], [2, 4]]
    assert top_candidates(grad, current, vocab, 9).shape == (2, 5)  # at most the vocabulary


def test_initial_prompts():
    vocab = torch.tensor([[1.0, 2.0], [3.0, 6.0]])
    mean = initial_prompts("mean_vocab", vocab, n=3, k=2, seed=0)
    assert mean.shape == (3, 2, 2) and torch.equal(mean[2, 1], torch.tensor([2.0, 4.0]))
    rows = initial_prompts("random_vocab", vocab, n=4, k=2, seed=0)
    assert all(any(torch.equal(r, v) for v in vocab) for r in rows.reshape(-1, 2))


# ---------------------------------------------------------------- the unroll modes


#: The devices the device-dependent tests run on: the CPU always, CUDA where there is one (``gpu``).
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def _student(model_dir, dtype=torch.float64, n=6, seed=0, dropout=0.0, device="cpu", base_dtype=None, attn="auto"):
    """A Student on the tiny model; ``base_dtype`` loads the base in that dtype and leaves the LoRA
    tensors as peft makes them (float32), as a bf16 run does; else everything is cast to ``dtype``."""
    base = str(base_dtype).split(".")[-1] if base_dtype else "auto"
    mcfg = ModelConfig(spec=str(model_dir), dtype=base, attn_implementation=attn)
    model, tok = load_model(mcfg, torch.device(device), needs_double_backward=True)
    model = add_lora(model, LoraConfig(r=2, alpha=4, dropout=dropout))
    if base_dtype is None:
        model = model.to(dtype)
    init_lora(model, seed)
    g = torch.Generator().manual_seed(5)
    data = []
    for i in range(n):
        ids = torch.randint(3, tok.vocab_size, (10 + i % 3,), generator=g).tolist()
        data.append(TokenizedExample(f"x/{i}", "x", ids, [-100] * 4 + ids[4:], False))
    return Student(model, data, tok.pad_token_id)


def _setup(student, seed=0):
    g = torch.Generator().manual_seed(seed)
    params = lora_parameters(student.model)
    dev = student.device

    def noise(t, scale):
        return scale * torch.randn(t.shape, generator=g, dtype=t.dtype).to(dev)

    theta0 = [p.detach().clone() for p in params.values()]
    theta0 = [t + noise(t.cpu(), 0.05) for t in theta0]  # B != 0
    target = [t + noise(t.cpu(), 0.1) for t in theta0]
    d = student.vocab.shape[1]
    dtype = student.vocab.dtype
    syn = student.vocab.detach().mean(0) + 0.1 * torch.randn(6, 2, d, generator=g, dtype=dtype).to(dev)
    batches = [torch.tensor([0, 3]), torch.tensor([1, 4]), torch.tensor([0, 5])]  # example 0 twice
    return theta0, target, syn, [b.to(dev) for b in batches]


def _grads(mode, student, theta0, target, syn, batches, log_alpha=-1.0, clip=None):
    syn = syn.clone().requires_grad_(True)
    la = torch.tensor(log_alpha, dtype=syn.dtype, device=syn.device, requires_grad=True)
    theta_n = unroll(mode, student, theta0, la.exp(), syn, batches, fd_eps=1e-4, clip=clip)
    loss = matching_loss(theta_n, target, theta0)
    loss.backward()
    return loss.detach(), syn.grad, la.grad


def _loss(student, theta0, target, syn, batches, log_alpha, clip=None):
    with torch.no_grad():
        alpha = torch.tensor(log_alpha, dtype=syn.dtype).exp()
        theta_n = unroll("flat", student, theta0, alpha, syn, batches, clip=clip)
        return matching_loss(theta_n, target, theta0).item()


@pytest.mark.parametrize("fixture", ["tiny_llama_dir", "tiny_gemma_dir"])
def test_modes_agree_and_match_finite_differences(fixture, request):
    student = _student(request.getfixturevalue(fixture))
    theta0, target, syn, batches = _setup(student)
    l_naive, g_naive, a_naive = _grads("naive", student, theta0, target, syn, batches)
    l_flat, g_flat, a_flat = _grads("flat", student, theta0, target, syn, batches)
    assert l_naive.item() == pytest.approx(l_flat.item(), rel=1e-12)
    rel = (g_flat - g_naive).norm() / g_naive.norm()
    assert rel < 1e-4 and g_naive.norm() > 0
    assert (a_flat - a_naive).abs() / a_naive.abs() < 1e-4
    # rows never sampled get no gradient; example 0 (sampled twice) does
    assert g_flat[2].abs().sum() == 0 and g_flat[0].abs().sum() > 0

    # central finite differences on alpha and on a few coordinates of D_syn. Transformers' RMSNorm and
    # rotary embeddings compute in float32 even in a float64 model, so the loss carries ~1e-9 noise:
    # a step of 1e-3 keeps both that noise and the O(h^2) error near 1e-6 of the derivative.
    h = 1e-3
    fd_alpha = (
        _loss(student, theta0, target, syn, batches, -1.0 + h) - _loss(student, theta0, target, syn, batches, -1.0 - h)
    ) / (2 * h)
    assert a_flat.item() == pytest.approx(fd_alpha, rel=1e-4)
    for row, tok, dim in [(0, 0, 0), (3, 1, 5), (5, 0, 7)]:
        plus, minus = syn.clone(), syn.clone()
        plus[row, tok, dim] += h
        minus[row, tok, dim] -= h
        fd = (
            _loss(student, theta0, target, plus, batches, -1.0) - _loss(student, theta0, target, minus, batches, -1.0)
        ) / (2 * h)
        assert g_flat[row, tok, dim].item() == pytest.approx(fd, rel=1e-3, abs=1e-7)

    # the approximate mode is close, not exact
    _, g_fd, a_fd = _grads("fd", student, theta0, target, syn, batches)
    assert (g_fd - g_naive).norm() / g_naive.norm() < 1e-2
    assert (a_fd - a_naive).abs() / a_naive.abs() < 1e-2


def test_flat_keeps_the_last_steps_graph_and_rebuilds_only_the_others(tiny_llama_dir):
    """flat runs 2N - 1 student steps per outer step (N forward, N - 1 rebuilt: the last forward step
    keeps its graph for the walk), N without a gradient to take; the kept graph is used once."""
    student = _student(tiny_llama_dir)
    theta0, target, syn, batches = _setup(student)
    calls = []
    real = student.step_loss
    student.step_loss = lambda *a, **k: calls.append(torch.is_grad_enabled()) or real(*a, **k)
    l_flat, g_flat, a_flat = _grads("flat", student, theta0, target, syn, batches)
    assert len(calls) == 2 * len(batches) - 1
    calls.clear()
    l_naive, g_naive, a_naive = _grads("naive", student, theta0, target, syn, batches)
    assert len(calls) == len(batches)
    assert l_flat.item() == pytest.approx(l_naive.item(), rel=1e-12)
    assert (g_flat - g_naive).norm() / g_naive.norm() < 1e-4
    calls.clear()
    _loss(student, theta0, target, syn, batches, -1.0)  # no gradient asked: N plain steps, no graph kept
    assert len(calls) == len(batches)

    # a second backward through the same unroll (retain_graph) rebuilds the step whose graph was used
    s = syn.clone().requires_grad_(True)
    alpha = torch.tensor(0.4, dtype=syn.dtype)
    loss = matching_loss(unroll("flat", student, theta0, alpha, s, batches), target, theta0)
    first = torch.autograd.grad(loss, s, retain_graph=True)[0]
    second = torch.autograd.grad(loss, s)[0]
    torch.testing.assert_close(first, second)


@pytest.mark.parametrize("device", DEVICES)
def test_flat_on_mixed_kernels_matches_naive(tiny_llama_dir, device):
    """A model loaded with SDPA, float32: flat's forward steps run on SDPA's default kernels (CPU: its
    flash kernel; CUDA: flash / memory-efficient / cuDNN), its second-order graphs on the math backend,
    naive on math throughout; flat's gradients are naive's."""
    student = _student(tiny_llama_dir, dtype=torch.float32, device=device, attn="sdpa")
    assert student.model.config._attn_implementation == "sdpa"
    theta0, target, syn, batches = _setup(student)
    l_naive, g_naive, a_naive = _grads("naive", student, theta0, target, syn, batches, clip=0.05)
    l_flat, g_flat, a_flat = _grads("flat", student, theta0, target, syn, batches, clip=0.05)
    assert g_flat.device.type == device and g_naive.norm() > 0
    assert l_flat.item() == pytest.approx(l_naive.item(), rel=1e-4)
    assert (g_flat - g_naive).norm() / g_naive.norm() < 1e-3
    assert (a_flat - a_naive).abs() / a_naive.abs() < 1e-3


@pytest.mark.parametrize("device", DEVICES)
def test_a_bf16_base_with_float32_lora_distills_close_to_float32(tiny_llama_dir, device):
    """A bf16 base (a GPU run's default) with peft's float32 LoRA tensors and float32 prompts: the
    unrolls keep theta in float32, flat and naive agree, and both are near the float32 model's gradient."""
    ref = _student(tiny_llama_dir, dtype=torch.float32, device=device)
    theta0, target, syn, batches = _setup(ref)
    _, g_ref, a_ref = _grads("naive", ref, theta0, target, syn, batches)
    student = _student(tiny_llama_dir, device=device, base_dtype=torch.bfloat16)
    assert student.vocab.dtype == torch.bfloat16 and set(student.dtypes) == {torch.float32}
    theta_n = unroll("flat", student, theta0, torch.tensor(0.4, device=student.device), syn, batches)
    assert {t.dtype for t in theta_n} == {torch.float32}
    grads = {mode: _grads(mode, student, theta0, target, syn, batches) for mode in ("flat", "naive")}
    for mode, (loss, g, a) in grads.items():
        assert g.dtype == torch.float32 and torch.isfinite(g).all() and torch.isfinite(loss), mode
        assert (g - g_ref).norm() / g_ref.norm() < 0.1, mode  # bf16 rounding, not a wrong gradient
        assert (a - a_ref).abs() / a_ref.abs() < 0.1, mode
    (_, g_flat, _), (_, g_naive, _) = grads["flat"], grads["naive"]
    assert (g_flat - g_naive).norm() / g_naive.norm() < 0.05


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fd_checks_itself_against_the_exact_gradient(tiny_llama_dir, dtype):
    student = _student(tiny_llama_dir, dtype=dtype)
    theta0, target, syn, batches = _setup(student)
    alpha = torch.tensor(0.4, dtype=dtype)
    assert fd_step(None, dtype) == pytest.approx(torch.finfo(torch.float32).eps ** (1 / 3))  # float32 at best
    assert fd_step(None, torch.bfloat16) == pytest.approx(torch.finfo(torch.bfloat16).eps ** (1 / 3))
    assert fd_step(0.1, dtype) == 0.1
    good = fd_relative_error(student, theta0, target, alpha, syn.to(dtype), batches, None, clip=0.05)
    assert good < 1e-2  # central differences at the precision's step: close where the loss is smooth
    bad = fd_relative_error(student, theta0, target, alpha, syn.to(dtype), batches, 30.0, clip=0.05)
    assert bad > 5e-2 > good  # a step far too large: the check sees it (distill then falls back to flat)


def test_auto_unroll_takes_naive_where_it_fits_and_flat_where_not(tiny_llama_dir, monkeypatch):
    from nacd import unrolls

    student = _student(tiny_llama_dir, dtype=torch.float32)
    theta0, target, syn, batches = _setup(student)
    alpha = torch.tensor(0.4)
    step = unrolls.naive_step_bytes(student, theta0, alpha, syn.float(), batches[0])
    assert step > 0  # one step's second-order graph holds memory
    info = unrolls.choose_unroll("auto", student, theta0, target, alpha, syn.float(), batches)
    assert info["used"] == "naive" and info["naive_bytes"] < info["free_bytes"] / 2
    free = 4 * info["naive_bytes"]  # naive fits in half of it for one process on the node, not for two
    monkeypatch.setattr(unrolls, "_available_memory", lambda: free)
    assert unrolls.choose_unroll("auto", student, theta0, target, alpha, syn.float(), batches)["used"] == "naive"
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")  # three processes share the CPU's memory: a third each
    info = unrolls.choose_unroll("auto", student, theta0, target, alpha, syn.float(), batches)
    assert info["used"] == "flat" and info["free_bytes"] == free // 3
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    monkeypatch.setattr(unrolls, "_available_memory", lambda: 1024)  # 1 kB free: naive cannot fit
    info = unrolls.choose_unroll("auto", student, theta0, target, alpha, syn.float(), batches)
    assert info["used"] == "flat" and info["free_bytes"] == 1024
    assert unrolls.choose_unroll("flat", student, theta0, target, alpha, syn, batches) == {
        "requested": "flat",
        "used": "flat",
    }


def test_processes_that_choose_different_unrolls_all_take_flat():
    from nacd.unrolls import agreed_unroll

    one = {"requested": "auto", "used": "naive", "naive_bytes": 10, "free_bytes": 100}
    assert agreed_unroll([one, dict(one)]) == one
    other = {**one, "used": "flat", "free_bytes": 15}  # a device with less free memory
    assert agreed_unroll([one, other]) == {**one, "used": "flat", "per_process": ["naive", "flat"]}
    fd = {"requested": "fd", "used": "fd"}
    assert agreed_unroll([fd, {**fd, "used": "flat"}])["used"] == "flat"


def test_lora_dropout_masks_are_replayed_in_the_reverse_walk(tiny_llama_dir):
    # with LoRA dropout every student step draws masks; flat and fd rebuild each step in the reverse
    # walk and must draw the same masks as the forward step, or their gradients belong to another loss
    student = _student(tiny_llama_dir, dropout=0.3)
    student.model.train()
    theta0, target, syn, batches = _setup(student)

    def grads(mode, seed):
        torch.manual_seed(seed)
        out = _grads(mode, student, theta0, target, syn, batches, clip=0.05)
        return (*out, torch.rand(1))  # where the caller's random stream stands afterwards

    grads("naive", 0)  # the student's first step runs a check forward (drawing masks): done before comparing
    l_naive, g_naive, a_naive, after_naive = grads("naive", 7)
    assert grads("naive", 8)[0] != l_naive  # the masks are random: another seed, another loss
    l_flat, g_flat, a_flat, after_flat = grads("flat", 7)
    assert l_flat.item() == pytest.approx(l_naive.item(), rel=1e-12)
    assert (g_flat - g_naive).norm() / g_naive.norm() < 1e-4 and g_naive.norm() > 0
    assert (a_flat - a_naive).abs() / a_naive.abs() < 1e-4
    assert torch.equal(after_flat, after_naive)  # the walk's replays leave the stream untouched
    _, g_fd, a_fd, after_fd = grads("fd", 7)
    assert (g_fd - g_naive).norm() / g_naive.norm() < 1e-2
    assert (a_fd - a_naive).abs() / a_naive.abs() < 1e-2
    assert torch.equal(after_fd, after_naive)


def test_clipped_steps_match_clip_grad_norm_and_differentiate_exactly(tiny_llama_dir):
    """Student steps clipped like the experts' optimizer: the forward step is clip_grad_norm_'s, and
    the flat and naive modes agree with each other and with finite differences through the clipping."""
    student = _student(tiny_llama_dir)
    theta0, target, syn, batches = _setup(student)
    th = [t.clone().requires_grad_(True) for t in theta0]
    loss0 = student.step_loss(th, syn[batches[0]], student.text_batch(batches[0].tolist()))
    norm = torch.sqrt(sum((g**2).sum() for g in torch.autograd.grad(loss0, th)))
    clip = 0.5 * float(norm)  # active on (at least) the first step
    # one clipped step equals SGD after torch.nn.utils.clip_grad_norm_
    params = [torch.nn.Parameter(t.clone()) for t in theta0]
    ref_loss = student.step_loss(params, syn[batches[0]], student.text_batch(batches[0].tolist()))
    ref_loss.backward()
    torch.nn.utils.clip_grad_norm_(params, clip)
    with torch.no_grad():
        one = unroll("flat", student, theta0, torch.tensor(0.3, dtype=syn.dtype), syn, batches[:1], clip=clip)
    for p, t in zip(params, one, strict=True):
        torch.testing.assert_close(t, p.detach() - 0.3 * p.grad)

    l_naive, g_naive, a_naive = _grads("naive", student, theta0, target, syn, batches, clip=clip)
    l_flat, g_flat, a_flat = _grads("flat", student, theta0, target, syn, batches, clip=clip)
    l_plain = _grads("flat", student, theta0, target, syn, batches)[0]
    assert abs(l_flat.item() - l_plain.item()) > 1e-6  # the clipping changed the trajectory
    assert l_naive.item() == pytest.approx(l_flat.item(), rel=1e-12)
    assert (g_flat - g_naive).norm() / g_naive.norm() < 1e-4
    assert (a_flat - a_naive).abs() / a_naive.abs() < 1e-4
    h = 1e-3
    fd_alpha = (
        _loss(student, theta0, target, syn, batches, -1.0 + h, clip)
        - _loss(student, theta0, target, syn, batches, -1.0 - h, clip)
    ) / (2 * h)
    assert a_flat.item() == pytest.approx(fd_alpha, rel=1e-4)
    for row, tok, dim in [(0, 0, 0), (3, 1, 5)]:
        plus, minus = syn.clone(), syn.clone()
        plus[row, tok, dim] += h
        minus[row, tok, dim] -= h
        fd = (
            _loss(student, theta0, target, plus, batches, -1.0, clip)
            - _loss(student, theta0, target, minus, batches, -1.0, clip)
        ) / (2 * h)
        assert g_flat[row, tok, dim].item() == pytest.approx(fd, rel=1e-3, abs=1e-7)
    _, g_fd, a_fd = _grads("fd", student, theta0, target, syn, batches, clip=clip)
    assert (g_fd - g_naive).norm() / g_naive.norm() < 1e-2
    assert (a_fd - a_naive).abs() / a_naive.abs() < 1e-2


def test_prompt_positions_carry_no_loss_and_scale_like_tokens(tiny_gemma_dir):
    student = _student(tiny_gemma_dir, dtype=torch.float32)
    text = student.text_batch([0, 1])
    prompts = torch.zeros(2, 3, student.vocab.shape[1])
    prompts[:, 0] = student.vocab[7].detach()
    batch = student.inputs(prompts, text)
    assert batch["inputs_embeds"].shape[1] == text["input_ids"].shape[1] + 3
    assert (batch["labels"][:, :3] == -100).all() and batch["attention_mask"][:, :3].all()
    # a prompt vector equal to token 7's raw embedding enters the model exactly as token 7 does
    token7 = student.embed(torch.tensor([[7]]))[0, 0]
    torch.testing.assert_close(batch["inputs_embeds"][0, 0], token7)
    assert student.embed_scale != 1.0  # Gemma scales its embeddings by sqrt(hidden)


def test_prompts_after_the_first_token_enter_as_inserted_tokens_would(tiny_gemma_dir):
    """``prompt_offset=1``: a prompt vector equal to token 7's raw embedding, put after the first text
    token, gives exactly the loss of the token sequence with 7 inserted there (labels shifted with it)."""
    student = _student(tiny_gemma_dir, dtype=torch.float32)
    text = student.text_batch([0, 1])
    prompt = student.vocab[7].detach().expand(2, 1, -1).clone()
    student.prompt_offset = 1
    batch = student.inputs(prompt, text)
    assert (batch["labels"][:, 1] == -100).all() and batch["attention_mask"][:, 1].all()
    torch.testing.assert_close(batch["labels"][:, 2:], text["labels"][:, 1:])
    ids = text["input_ids"]
    inserted = {
        "input_ids": torch.cat([ids[:, :1], torch.full_like(ids[:, :1], 7), ids[:, 1:]], dim=1),
        "attention_mask": batch["attention_mask"],
        "labels": batch["labels"],
    }
    with torch.no_grad():  # the plain model, before the student installs its loss-positions-only forward
        want = student.model(**inserted).loss
    theta = [p.detach() for p in lora_parameters(student.model).values()]
    got = student.step_loss(theta, prompt, text)
    torch.testing.assert_close(got.detach(), want, rtol=1e-5, atol=1e-6)
    student.prompt_offset = 0  # and the paper's placement differs: the position matters
    assert float(student.step_loss(theta, prompt, text)) != pytest.approx(float(got))
    with pytest.raises(ValueError, match="prompt offset 40: the batch has"):
        prompted_inputs(student.embed, student.embed_scale, prompt, text, 40)
    with pytest.raises(NacdError, match=r"distill.prompt_offset=12: example 'x/0' has only 10 token"):
        check_prompt_offset(student.data, 12)
    check_prompt_offset(student.data, 9)  # every example has a token after the 9th


def test_pez_forward_is_the_token_sequence_and_its_gradient_reaches_the_continuous_copy(tiny_gemma_dir):
    """distill.discrete=pez on the tiny Gemma (scaled embeddings): continuous prompts projected
    straight-through give exactly the loss of the text with the projected tokens in front, and the
    gradient with respect to the continuous copy is the gradient with respect to those token embeddings."""
    student = _student(tiny_gemma_dir, dtype=torch.float32)
    text = student.text_batch([0, 1])
    vocab = student.vocab.detach()
    gen = torch.Generator().manual_seed(0)
    syn = torch.nn.Parameter(
        vocab[[5, 9, 11, 13]].reshape(2, 2, -1) + 0.3 * torch.randn(2, 2, vocab.shape[1], generator=gen)
    )
    rows = torch.tensor([0, 1])
    hard_ids = nearest_rows(syn.detach().reshape(-1, vocab.shape[1]), vocab, "cosine").reshape(2, 2)
    theta = [p.detach() for p in lora_parameters(student.model).values()]
    batch = student.inputs(vocab[hard_ids], text)
    inserted = {
        "input_ids": torch.cat([hard_ids, text["input_ids"]], dim=1),
        "attention_mask": batch["attention_mask"],
        "labels": batch["labels"],
    }
    with torch.no_grad():
        want = student.model(**inserted).loss  # the plain model, before the student's sparse forward
    got = student.step_loss(theta, straight_through(syn, vocab, rows, "cosine"), text)
    torch.testing.assert_close(got.detach(), want, rtol=1e-5, atol=1e-6)
    got.backward()
    hard = vocab[hard_ids].clone().requires_grad_(True)
    student.step_loss(theta, hard, text).backward()
    torch.testing.assert_close(syn.grad, hard.grad)


def test_scale_free_regularizers_by_hand():
    from nacd.tm import vocab_spacing

    vocab = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 3.0], [5.0, 5.0]])
    # nearest other row: 1, 1, 3, sqrt(29); median of the four (torch: the lower middle) = 1
    assert vocab_spacing(vocab) == pytest.approx(1.0)
    assert vocab_spacing(vocab, chunk=1) == pytest.approx(1.0)  # chunking does not change it
    wide = vocab * 4
    assert vocab_spacing(wide) == pytest.approx(4.0)
    p = torch.tensor([[0.5, 0.0], [0.0, 2.0]], requires_grad=True)  # distances 0.5 (to row 0 or 1), 1 (row 2)
    assert float(regularizer(p.detach(), vocab)) == pytest.approx(0.75)
    assert float(regularizer(p.detach(), vocab, kind="spacing", spacing=0.5)) == pytest.approx(1.5)
    sq = regularizer(p, vocab, kind="spacing_squared", spacing=0.5)
    assert float(sq.detach()) == pytest.approx((1.0**2 + 2.0**2) / 2)
    sq.backward()  # d/dp mean((d/s)^2) = (p - e) * 2 / (s^2 n)
    torch.testing.assert_close(p.grad[1], torch.tensor([0.0, -1.0]) * 2 / (0.25 * 2))
    # the same prompts in a 4x wider embedding space give the same scaled penalty
    same = float(regularizer(p.detach(), vocab, kind="spacing", spacing=vocab_spacing(vocab)))
    assert float(regularizer(p.detach() * 4, wide, kind="spacing", spacing=vocab_spacing(wide))) == pytest.approx(same)
    with pytest.raises(Exception, match="distill.regularizer='cube'"):
        regularizer(p, vocab, kind="cube")


def test_token_inits_are_distinct_real_tokens():
    from nacd.tm import token_init_rows

    vocab = torch.arange(40.0).reshape(20, 2)
    rows = [[1, 2, 3, 4, 0], [5, 6, 7, 0], [8, 9, 10, 0], [11, 12, 0]]  # row 0: in every example (template)
    own = initial_prompts("example_tokens", vocab, 4, 2, seed=0, example_rows=rows)
    assert own.shape == (4, 2, 2)
    picked = token_init_rows("example_tokens", rows, 2, torch.Generator().manual_seed(0))
    for mine, pool in zip(picked, rows, strict=True):
        assert len(set(mine)) == 2 and set(mine) <= set(pool) - {0}  # own, distinctive, distinct
    torch.testing.assert_close(own, vocab[torch.tensor(picked)])
    freq = token_init_rows("frequent_vocab", [[1, 1, 2], [1, 3, 6], [4, 5]], 2, torch.Generator().manual_seed(0))
    flat = [r for ex in freq for r in ex]
    assert len(flat) == len(set(flat)) == 6  # distinct across examples while the pool lasts
    with pytest.raises(Exception, match="needs the instruction tokens"):
        initial_prompts("example_tokens", vocab, 4, 2, seed=0)
    with pytest.raises(Exception, match="no instruction token"):
        initial_prompts("example_tokens", vocab, 1, 2, seed=0, example_rows=[[]])


def test_token_inits_moved_toward_the_mean_stay_distinct():
    vocab = torch.arange(40.0).reshape(20, 2)
    rows = [[1, 2, 3, 4, 0], [5, 6, 7, 0], [8, 9, 10, 0], [11, 12, 0]]
    own = initial_prompts("example_tokens", vocab, 4, 2, seed=0, example_rows=rows)
    mean = torch.tensor([19.0, 20.0])  # of rows 0..19: (0 + 38) / 2, (1 + 39) / 2
    quarter = initial_prompts("example_tokens", vocab, 4, 2, seed=0, example_rows=rows, toward_mean=0.25)
    torch.testing.assert_close(quarter, 0.75 * own + 0.25 * mean)
    assert len({tuple(v.tolist()) for v in quarter.reshape(-1, 2)}) == 8  # still 8 distinct vectors
    whole = initial_prompts("example_tokens", vocab, 4, 2, seed=0, example_rows=rows, toward_mean=1.0)
    torch.testing.assert_close(whole, initial_prompts("mean_vocab", vocab, 4, 2, seed=0))
    with pytest.raises(Exception, match="init_toward_mean"):
        initial_prompts("mean_vocab", vocab, 4, 2, seed=0, toward_mean=1.5)


def test_endpoint_is_the_unrolls_point(tiny_llama_dir):
    """The panel's first-order student reaches the same theta_N as the differentiable unroll."""
    from nacd.unrolls import endpoint

    student = _student(tiny_llama_dir)
    theta0, _, syn, batches = _setup(student)
    alpha = torch.tensor(0.3, dtype=torch.float64)
    flat = unroll("flat", student, theta0, alpha, syn, batches, clip=0.5)
    plain = endpoint(student, theta0, alpha, syn, batches, clip=0.5)
    for a, b in zip(flat, plain, strict=True):
        torch.testing.assert_close(a.detach(), b)
    student.close()
