import torch, triton, sys
sys.path.insert(0, "benchmarks")
import _old_redundancy as old
from nanozipage.kernels.redundancy import redundancy_sums_triton, redundancy_sums_ref
keys = torch.randn(28, 8, 2304, 128, device="cuda", dtype=torch.bfloat16)
ref = redundancy_sums_ref(keys[:2], 256)
flops = 2 * 28 * 8 * 9 * 256 * 256 * 128
t = triton.testing.do_bench(lambda: old.redundancy_sums_triton(keys, 256), warmup=50, rep=200)
print(f"old two-pass: {t*1000:.0f} us, {flops*2/t/1e9:.0f} TFLOP/s (dots done)")
for bm in (16, 32, 64, 128):
    for w in (4, 8):
        for st in (1, 2):
            try:
                out = redundancy_sums_triton(keys, 256, block_m=bm, num_warps=w, num_stages=st)
                err = (out[:2] - ref).abs().max().item()
                t = triton.testing.do_bench(lambda: redundancy_sums_triton(keys, 256, block_m=bm, num_warps=w, num_stages=st), warmup=50, rep=200)
                print(f"one-pass block_m={bm} warps={w} stages={st}: {t*1000:.0f} us, {flops/t/1e9:.0f} TFLOP/s, err {err:.2e}")
            except Exception as e:
                print(bm, w, st, "failed", str(e)[:100])
