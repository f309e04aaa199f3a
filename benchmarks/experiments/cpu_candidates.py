"""Probe (issue 13): dense F.linear vs embedding_bag vs index_select+mv over kept rows of W^T, warm cache. Run: python3 benchmarks/experiments/cpu_candidates.py"""
import torch, time, torch.nn.functional as F
torch.manual_seed(0)
def tm(f, n=30):
    for _ in range(3): f()
    ts=[]
    for _ in range(n):
        t=time.perf_counter(); f(); ts.append(time.perf_counter()-t)
    ts.sort(); return ts[len(ts)//2]*1e6
for dt in (torch.float32, torch.bfloat16):
  for (o,i) in ((1536,576),(576*3,576),(8192,2048),(2048,8192)):
    W=torch.randn(o,i,dtype=dt); Wt=W.t().contiguous(); WtT=Wt.t()
    x=torch.randn(1,i,dtype=dt)
    row=[]
    row.append(("dense",tm(lambda: F.linear(x,W))))
    row.append(("denseT",tm(lambda: F.linear(x,WtT))))
    for s in (0.0,0.5,0.65,0.9):
        tau=torch.quantile(x.abs().float(),s).item() if s>0 else -1
        def eb():
            m=x[0].abs()>tau; idx=m.nonzero().squeeze(1)
            return F.embedding_bag(idx, Wt, torch.zeros(1,dtype=torch.long), per_sample_weights=x[0,idx], mode="sum")
        def ism():
            m=x[0].abs()>tau; idx=m.nonzero().squeeze(1)
            return x[0,idx] @ Wt.index_select(0,idx)
        row.append((f"eb{s}",tm(eb))); row.append((f"is{s}",tm(ism)))
    print(dt,o,i," ".join(f"{k}={v:.0f}" for k,v in row),flush=True)
