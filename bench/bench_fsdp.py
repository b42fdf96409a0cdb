"""Wan2.2 A14B, one expert, full fine-tuning with FSDP2 over several GPUs; sharded checkpoint and exact resume;
context parallelism (issue 15). Launch with torchrun, one process per GPU (or per CPU rank with --device cpu, gloo):

    torchrun --nproc-per-node 2 bench/bench_fsdp.py --save /tmp/ck --out fsdp.json          # A14B step time, memory, save
    torchrun --nproc-per-node 2 bench/bench_fsdp.py --load /tmp/ck --check                   # resume: the next steps equal
    torchrun --nproc-per-node 1 bench/bench_fsdp.py --load /tmp/ck --check                   # ... on another number of GPUs
    torchrun --nproc-per-node 2 bench/bench_fsdp.py --agree --layers 4                        # context parallel = 1 GPU (`agreement`)
    torchrun --nproc-per-node 2 bench/bench_fsdp.py --longest --height 720 --width 1280       # longest clip, CP 1 vs 2
    torchrun --nproc-per-node 1 bench/bench_fsdp.py --lora 64                                # LoRA on one GPU (peft)

The DiT is diffusers' `WanTransformer3DModel` with the Wan2.2-T2V-A14B transformer configuration of diffusers'
converter (scripts/convert_wan_to_diffusers.py, `"Wan2.2-T2V-A14B"`, lines 529-547 at 58eb52c): 40 blocks of width
5120 (40 heads x 128), ffn 13824, 16 latent channels (VAE 8x in space, 4x in time), text 4096; random weights, pure
bf16 (weights and AdamW states; FSDP2 needs one dtype per block, so the float32 modules are off). Every rank sees the
same clip (the workbench's data order), so without context parallelism FSDP2's averaged gradient is the one-GPU
gradient. One step is `sara.train.step_losses` (method sft, or sara with a random cached target) + backward + AdamW.
FSDP2: `torch.distributed.fsdp.fully_shard` per `WanTransformerBlock`, then the root. Checkpoint: model and optimiser
through `torch.distributed.checkpoint` (DCP) with `get_state_dict` / `set_state_dict`, so a checkpoint written by N
processes loads on M. Context parallelism: `sara.train.enable_context_parallel` (diffusers' Ulysses attention over the
ranks), composed with FSDP2 over the same ranks; `sara.train.cp_gather` gathers the projected tap features and the loss is
multiplied by the degree before backward (each rank back-propagates its share of the tokens; FSDP2 averages).
"""
import argparse, json, math, os, statistics, sys, time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist

A14B = dict(patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=16, out_channels=16,
            text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
SMALL = dict(A14B, num_attention_heads=4, attention_head_dim=16, ffn_dim=96, text_dim=32, freq_dim=32, num_layers=4)
VAE = dict(spatial=8, temporal=4)        # Wan2.1 VAE of the A14B experts


def setup(device: str):
    "Process group from torchrun's environment (nccl on CUDA, gloo on the CPU); rank, world size, device."
    backend = "nccl" if device == "cuda" else "gloo"
    if not dist.is_initialized():
        if "RANK" not in os.environ:   # plain `python bench_fsdp.py`: one process
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="29517")
        dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if device == "cuda" else torch.device("cpu")
    if dev.type == "cuda": torch.cuda.set_device(dev)
    return rank, world, dev


def build(cfg: dict, dev, dtype, seed: int, ckpt: str, cp: int, world: int, attention: str = "", lora: int = 0, fsdp: bool = True):
    "The DiT with its levers, sharded with FSDP2 over all ranks (block by block, then the root), and its AdamW."
    from diffusers import WanTransformer3DModel
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.device_mesh import init_device_mesh
    from sara.config import RunConfig
    from sara.train import add_lora, apply_levers, make_adamw
    torch.manual_seed(seed)
    old = torch.get_default_dtype(); torch.set_default_dtype(dtype)   # built in its dtype: no float32 copy of 14 B weights
    try:
        with torch.device(dev): dit = WanTransformer3DModel(**cfg)
    finally: torch.set_default_dtype(old)
    dit.train()
    if lora: add_lora(dit, lora, 0); dit.to(dev)
    apply_levers(dit, dict(grad_checkpointing=ckpt, attention_backend=attention, compile="off", fused_adamw=False,
                           fp32_modules=False, why=[]), context_parallel=cp, log=None)
    if fsdp:
        mesh = init_device_mesh(dev.type, (world,))
        for b in dit.blocks: fully_shard(b, mesh=mesh)
        fully_shard(dit, mesh=mesh)
    params = [p for p in dit.parameters() if p.requires_grad]
    return dit, make_adamw(params, RunConfig(lr=1e-5), fused=dev.type == "cuda")


def make_batch(cfg, dev, dtype, frames, height, width, method, vfm_dim=64):
    "A random clip of the given size (the same on every rank), with a random cached target for sara."
    lat = (1, cfg["in_channels"], (frames - 1) // VAE["temporal"] + 1, height // VAE["spatial"], width // VAE["spatial"])
    p = cfg["patch_size"]
    n_tok = lat[2] * (lat[3] // p[1]) * (lat[4] // p[2])
    g = torch.Generator(device=dev).manual_seed(0)
    b = dict(latents=torch.randn(lat, device=dev, dtype=dtype, generator=g),
             prompt=torch.randn(1, 512, cfg["text_dim"], device=dev, dtype=dtype, generator=g))
    if method == "sara":
        grid = (2 * (lat[2] - 1), lat[3] // p[1], lat[4] // p[2])
        b.update(y=torch.randn(1, math.prod(grid), vfm_dim, device=dev, dtype=dtype, generator=g),
                 w=torch.rand(1, math.prod(grid), device=dev, generator=g), grid=grid)
    return b, n_tok


class Stepper:
    "One training step of `dit` through `sara.train.step_losses` (the workbench's code path)."
    def __init__(self, dit, opt, method, cp, dev, dtype, vfm_dim=64, block=1):
        from diffusers import FlowMatchEulerDiscreteScheduler
        from sara.config import RunConfig
        from sara.train import Models
        from sara.wan import Projector, WanParts
        torch.manual_seed(1)
        C = dit.config.num_attention_heads * dit.config.attention_head_dim
        proj = Projector(C, vfm_dim).to(dev, dtype)
        if method == "sft": proj.requires_grad_(False)
        else:   # sharded too, so that its gradient is averaged over the ranks like the DiT's (accelerate: one root)
            if hasattr(dit, "reshard"):
                from torch.distributed.fsdp import fully_shard
                fully_shard(proj, mesh=dit.blocks[0]._get_fsdp_state()._fsdp_param_group.mesh_info.mesh)
            opt.add_param_group(dict(params=list(proj.parameters())))
        sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
        self.models = Models(wan=WanParts(transformer=dit, vae=SimpleNamespace(config=SimpleNamespace(scale_factor_temporal=VAE["temporal"])),
                                          scheduler=sched), projector=proj, block=block)
        self.rc = RunConfig(method=method, op="or", block=block, lam=0.5, trd_impl="auto")
        self.opt, self.cp, self.noise_gen = opt, cp, torch.Generator().manual_seed(2)

    def __call__(self, batch, update=True):
        from sara.train import step_losses
        losses = step_losses(batch, self.models, self.rc, self.noise_gen)
        self.opt.zero_grad(set_to_none=True)
        (losses["total"] * self.cp).backward()          # each rank holds its share of the tokens' gradient
        if update: self.opt.step()
        return {k: v.item() for k, v in losses.items()}


def sync_time(dev):
    if dev.type == "cuda": torch.cuda.synchronize()
    return time.perf_counter()


def peak_gib(dev):
    return torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else 0.0


def max_over_ranks(x: float, dev) -> float:
    t = torch.tensor([x], dtype=torch.float64, device=dev); dist.all_reduce(t, op=dist.ReduceOp.MAX); return t.item()


def save_state(dit, opt, stepper, folder: Path, step: int, rank: int):
    "Model and optimiser through DCP (sharded, reshardable), plus the step and the noise generator (rank 0, JSON)."
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    msd, osd = get_state_dict(dit, opt)
    dcp.save(dict(model=msd, optim=osd), checkpoint_id=str(folder))
    if rank == 0:
        (folder / "extra.json").write_text(json.dumps(dict(step=step, noise=stepper.noise_gen.get_state().tolist())))
    dist.barrier()


def load_state(dit, opt, stepper, folder: Path) -> int:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    msd, osd = get_state_dict(dit, opt)
    sd = dict(model=msd, optim=osd)
    dcp.load(sd, checkpoint_id=str(folder))
    set_state_dict(dit, opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
    extra = json.loads((folder / "extra.json").read_text())
    stepper.noise_gen.set_state(torch.tensor(extra["noise"], dtype=torch.uint8))
    return extra["step"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--dit", default="a14b", choices=["a14b", "small"]); ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--frames", type=int, default=81); ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--width", type=int, default=832); ap.add_argument("--method", default="sft", choices=["sft", "sara"])
    ap.add_argument("--ckpt", default="full", choices=["off", "full", "selective"], help="gradient checkpointing")
    ap.add_argument("--attention", default="", help="diffusers attention backend ('' = default)")
    ap.add_argument("--cp", type=int, default=1, help="context-parallel degree (1 or the number of processes)")
    ap.add_argument("--steps", type=int, default=3); ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--save", default="", help="write a DCP checkpoint here after the timed steps, then run --check-steps more")
    ap.add_argument("--load", default="", help="resume from a DCP checkpoint written by --save (any number of processes)")
    ap.add_argument("--check", action="store_true", help="with --load: the next steps must equal the saving run's")
    ap.add_argument("--check-steps", type=int, default=2)
    ap.add_argument("--agree", action="store_true", help="one step with and without context parallelism: loss and gradients")
    ap.add_argument("--longest", action="store_true", help="longest clip (frames at --height x --width) that fits, CP 1 vs all ranks")
    ap.add_argument("--frames-list", default="81,121,161,201,241", help="--longest: frame counts tried, in order")
    ap.add_argument("--lora", type=int, default=0, help="LoRA rank (peft; one process, no FSDP)")
    ap.add_argument("--dtype", default="", help="bfloat16 (CUDA default) | float32 (CPU default)")
    ap.add_argument("--out", default="", help="JSON results (rank 0)")
    args = ap.parse_args(argv)
    rank, world, dev = setup(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    if dtype == torch.float32: torch.backends.cudnn.allow_tf32 = False   # float32 means float32 (the patch-embedding conv too)
    cfg = dict(A14B if args.dit == "a14b" else SMALL, **({"num_layers": args.layers} if args.layers else {}))
    say = (lambda *a: print(*a, flush=True)) if rank == 0 else (lambda *a: None)
    res = dict(world=world, device=torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", torch=torch.__version__,
               config=cfg, dtype=str(dtype), frames=args.frames, height=args.height, width=args.width, method=args.method,
               ckpt=args.ckpt, cp=args.cp)

    if args.agree:
        res["agree"] = agree(args, cfg, dev, dtype, world, rank, say)
    elif args.longest:
        res["longest"] = longest(args, cfg, dev, dtype, world, say)
    else:
        dit, opt = build(cfg, dev, dtype, 0, args.ckpt, args.cp, world, args.attention, args.lora, fsdp=not args.lora)
        n_params = sum(p.numel() for p in dit.parameters())   # DTensor.numel(): the whole parameter
        stepper = Stepper(dit, opt, args.method, args.cp, dev, dtype)
        batch, n_tok = make_batch(cfg, dev, dtype, args.frames, args.height, args.width, args.method)
        say(f"{res['device']} x {world}, torch {torch.__version__}; DiT ~{n_params / 1e9:.2f} B params, {cfg['num_layers']} blocks, "
            f"{n_tok} tokens ({args.height}x{args.width}, {args.frames} frames), {dtype}, ckpt {args.ckpt}, cp {args.cp}"
            + (f", LoRA rank {args.lora}" if args.lora else ", FSDP2"))
        if args.load:
            t = sync_time(dev); step = load_state(dit, opt, stepper, Path(args.load)); res["load_s"] = sync_time(dev) - t
            say(f"resumed {args.load} at step {step} in {res['load_s']:.1f} s (written by another run; this one has {world} processes)")
            if args.check:
                ref = json.loads((Path(args.load) / "after.json").read_text())
                got = [stepper(batch) for _ in range(len(ref["losses"]))]
                diff = max(abs(a[k] - b[k]) for a, b in zip(got, ref["losses"]) for k in ("fm", "total"))
                res.update(resumed=got, reference=ref["losses"], max_abs_diff=diff, saved_by=ref["world"])
                tol = 0.0 if dev.type == "cpu" and ref["world"] == world else (1e-6 if dev.type == "cpu" else 2e-3)
                say(f"resume check ({ref['world']} -> {world} processes): losses {[round(g['total'], 6) for g in got]} vs "
                    f"{[round(r['total'], 6) for r in ref['losses']]}, max |diff| {diff:.3e} (tolerance {tol:g})")
                res["resume_ok"] = diff <= tol
                say("RESUME CHECK " + ("PASSED" if res["resume_ok"] else "FAILED"))
        else:
            times = []
            if dev.type == "cuda": torch.cuda.reset_peak_memory_stats(dev)
            for i in range(args.warmup + args.steps):
                t = sync_time(dev); losses = stepper(batch); times.append(sync_time(dev) - t)
                say(f"  step {i + 1}: {times[-1]:.2f} s, fm {losses['fm']:.4f}")
            med = statistics.median(times[args.warmup:])
            res.update(step_s=med, first_s=times[0], tokens_s_per_gpu=n_tok / med / (world if args.cp == 1 else 1),
                       peak_gib_per_gpu=max_over_ranks(peak_gib(dev), dev), losses=losses, n_tokens=n_tok)
            say(f"step {med:.3f} s (median of {args.steps} after {args.warmup}), peak {res['peak_gib_per_gpu']:.2f} GiB per GPU "
                f"(max over ranks), {n_tok} tokens")
            if args.save:
                folder = Path(args.save); t = sync_time(dev)
                save_state(dit, opt, stepper, folder, args.warmup + args.steps, rank); res["save_s"] = sync_time(dev) - t
                after = [stepper(batch) for _ in range(args.check_steps)]
                if rank == 0: (folder / "after.json").write_text(json.dumps(dict(world=world, losses=after)))
                say(f"saved DCP checkpoint {folder} in {res['save_s']:.1f} s; next {args.check_steps} losses "
                    f"{[round(a['total'], 6) for a in after]} -> {folder}/after.json")
    if args.out and rank == 0:
        Path(args.out).write_text(json.dumps(res, indent=1, default=str))
    dist.barrier(); dist.destroy_process_group()
    return res


AGREE_TOL = {   # context parallel vs one GPU, one step
    "float32": dict(loss=1e-5, grad_max=1e-4),              # every gradient tensor within 1e-4 relative
    "bfloat16": dict(loss=2e-2, grad_global=1e-2, grad_median=1e-2)}   # see `agreement`


def agreement(
    rel: dict,                  # gradient tensor name -> ||g_cp - g_1|| / ||g_1||
    diff_sq: float,             # sum over the tensors of ||g_cp - g_1||^2
    ref_sq: float,              # sum over the tensors of ||g_1||^2
    loss_1: float,              # the step's loss on one GPU
    loss_cp: float,             # ... with context parallelism
    dtype: str,                 # "float32" or "bfloat16"
) -> dict:                      # the figures, the criterion in words, and ok
    """Whether context parallelism gives the one-GPU step. float32: the loss within 1e-5 (relative) and every gradient
    tensor within 1e-4. bfloat16 at full depth: the loss within 2e-2, the global relative error (all tensors concatenated)
    within 1e-2 and the median tensor within 1e-2. Not every tensor: bf16 rounds the partial sums differently when the
    tokens are split, and a small gradient made of cancelling sums (the worst tensor of the H200 runs, in bf16 and in
    float32 alike, was a cross-attention key bias) gets a large relative error while adding little to the update; the
    per-tensor maximum is reported (and saved per tensor) but not a criterion."""
    worst = max(rel, key=rel.get)
    res = dict(loss_diff=abs(loss_1 - loss_cp), grad_rel_max=rel[worst], worst=worst,
               grad_rel_median=statistics.median(rel.values()), grad_rel_global=math.sqrt(diff_sq / max(ref_sq, 1e-300)),
               n_params=len(rel), dtype=dtype)
    if dtype not in AGREE_TOL: raise SystemExit(f"--agree: no criterion for dtype {dtype} (float32 or bfloat16)")
    tol = res["tolerance"] = AGREE_TOL[dtype]
    loss_ok = res["loss_diff"] <= tol["loss"] * max(1.0, abs(loss_1))
    if dtype == "float32":
        res["criterion"] = f"loss within {tol['loss']:g} relative, every gradient tensor within {tol['grad_max']:g}"
        res["ok"] = loss_ok and res["grad_rel_max"] <= tol["grad_max"]
    else:
        res["criterion"] = (f"loss within {tol['loss']:g} relative, global gradient relative error within {tol['grad_global']:g}, "
                            f"median tensor within {tol['grad_median']:g} (the per-tensor maximum reported, not a criterion)")
        res["ok"] = loss_ok and res["grad_rel_global"] <= tol["grad_global"] and res["grad_rel_median"] <= tol["grad_median"]
    return res


def agree(args, cfg, dev, dtype, world, rank, say) -> dict:
    """Loss and gradients of one step with context parallelism over all ranks against the same step without it. The
    first run's whole gradients are kept on rank 0's CPU in their dtype (A14B bf16: 28 GB); the second's are compared
    tensor by tensor as they are gathered: each tensor's relative error (saved, `grad_rel`) and the sums for the global
    one. The verdict is `agreement`'s."""
    import gc
    losses, ref, rel, sq = {}, {}, {}, [0.0, 0.0]
    for cp in (1, world):
        dit, opt = build(cfg, dev, dtype, 0, args.ckpt, cp, world, args.attention)
        stepper = Stepper(dit, opt, args.method, cp, dev, dtype)
        batch, n_tok = make_batch(cfg, dev, dtype, args.frames, args.height, args.width, args.method)
        if n_tok % world: raise SystemExit(f"{n_tok} tokens do not split over {world} ranks")
        losses[cp] = stepper(batch, update=False)
        named = [*dit.named_parameters(), *((f"projector.{n}", p) for n, p in stepper.models.projector.named_parameters())]
        for n, p in named:
            if p.grad is None: continue
            g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad   # a collective: every rank calls it
            if rank != 0: continue
            if cp == 1: ref[n] = g.detach().cpu()
            else:
                r = ref.pop(n).to(g.device).float()
                d, rn = (g.float() - r).double().norm().item(), r.double().norm().item()
                rel[n] = d / max(rn, 1e-30); sq[0] += d * d; sq[1] += rn * rn
            del g
        del dit, opt, stepper, named, batch
        gc.collect()
        if dev.type == "cuda": torch.cuda.empty_cache()
    l1, lc = losses[1], losses[world]
    if rank != 0: return {}
    res = dict(loss_1=l1, loss_cp=lc, **agreement(rel, sq[0], sq[1], l1["total"], lc["total"], str(dtype).removeprefix("torch.")),
               grad_rel=rel)
    say(f"context parallel {world} vs 1: loss {lc['total']:.6f} vs {l1['total']:.6f} (|diff| {res['loss_diff']:.2e}); "
        f"gradient relative error global {res['grad_rel_global']:.2e}, per tensor max {res['grad_rel_max']:.2e} ({res['worst']}), "
        f"median {res['grad_rel_median']:.2e} over {res['n_params']} tensors; criterion ({res['dtype']}): {res['criterion']}")
    say("CONTEXT PARALLEL AGREEMENT " + ("PASSED" if res["ok"] else "FAILED"))
    return res


def extrapolate(peak: float, cfg: dict, args, n_tok: int, cp: int, world: int) -> float:
    """Peak GiB per GPU at the full depth (A14B's 40 blocks) from a run with fewer: each further block adds its share of
    bf16 weights, gradients and two AdamW states (sharded over the ranks) and, under full checkpointing, its saved input
    (this rank's tokens x width, bf16). Selective or no checkpointing keep more: then this is a lower bound."""
    extra = A14B["num_layers"] - cfg["num_layers"]
    if extra <= 0: return peak
    C, F = cfg["num_attention_heads"] * cfg["attention_head_dim"], cfg["ffn_dim"]
    block_params = 4 * C * C + 4 * C * C + 2 * C * F + 6 * C            # self- and cross-attention, ffn, modulation
    return peak + extra * (block_params * 8 / world + n_tok / cp * C * 2) / 2**30


def longest(args, cfg, dev, dtype, world, say) -> dict:
    "Frames at --height x --width that fit one step (forward, backward, AdamW), without and with context parallelism."
    res = {}
    for cp in (1, world):
        dit, opt = build(cfg, dev, dtype, 0, args.ckpt, cp, world, args.attention)
        stepper, fits = Stepper(dit, opt, args.method, cp, dev, dtype), []
        for frames in (int(f) for f in args.frames_list.split(",")):
            batch, n_tok = make_batch(cfg, dev, dtype, frames, args.height, args.width, args.method)
            if n_tok % cp: say(f"  cp {cp}: {frames} frames, {n_tok} tokens do not split over {cp}"); continue
            ok = torch.ones(1, device=dev)
            try:
                if dev.type == "cuda": torch.cuda.reset_peak_memory_stats(dev)
                t = sync_time(dev); stepper(batch); dt = sync_time(dev) - t
            except torch.OutOfMemoryError:
                ok.zero_(); dt = float("nan")
            for p in dit.parameters(): p.grad = None
            batch = None
            if dev.type == "cuda": torch.cuda.empty_cache()
            dist.all_reduce(ok, op=dist.ReduceOp.MIN)
            pk = max_over_ranks(peak_gib(dev), dev)
            say(f"  cp {cp}: {frames} frames ({n_tok} tokens): " + (f"fits, {dt:.1f} s, peak {pk:.1f} GiB" if ok.item() else "out of memory"))
            if not ok.item(): break
            fits.append(dict(frames=frames, tokens=n_tok, step_s=dt, peak_gib=pk, peak_gib_full_depth=extrapolate(pk, cfg, args, n_tok, cp, world)))
            if args.layers: say(f"    extrapolated to {A14B['num_layers']} blocks: {fits[-1]['peak_gib_full_depth']:.1f} GiB per GPU")
        res[cp] = fits
        del dit, opt, stepper
        if dev.type == "cuda": torch.cuda.empty_cache()
    cap = torch.cuda.get_device_properties(dev).total_memory / 2**30 if dev.type == "cuda" else float("inf")
    for cp, f in res.items():
        say(f"longest at {args.height}x{args.width} with context parallel {cp} ({cfg['num_layers']} blocks): "
            + (f"{f[-1]['frames']} frames, {f[-1]['tokens']} tokens" if f else "none of the sizes tried"))
        if args.layers:
            ok = [r for r in f if r["peak_gib_full_depth"] <= 0.95 * cap]
            say(f"  extrapolated to {A14B['num_layers']} blocks (95% of {cap:.0f} GiB): "
                + (f"{ok[-1]['frames']} frames, {ok[-1]['tokens']} tokens" if ok else "none of the sizes tried"))
    return res


if __name__ == "__main__":
    main()
