"""Probe (issue 13): dense vs the runtime gather, cold cache (128 MiB cycled). Run: python3 benchmarks/experiments/cpu_gather_cold.py THREADS"""
import torch, time, statistics, sys
import torch.nn.functional as F
from winaconv_runtime import cpu_kernels as K
torch.set_num_threads(int(sys.argv[1]))
for dt in (torch.float32, torch.bfloat16):
  for (i,o) in ((576,1536),(2048,8192)):
    n=max(2,(128<<20)//(i*o*dt.itemsize))
    Ws=[torch.randn(o,i).to(dt) for _ in range(n)]; Wts=[w.t().contiguous() for w in Ws]
    x=torch.randn(1,i).to(dt)
    res={}
    for r in range(5):
        t=time.perf_counter(); [F.linear(x,w) for w in Ws]; res.setdefault('d',[]).append((time.perf_counter()-t)/n*1e3)
        for s in (0.0,0.5,0.65):
            tau=torch.full((1,i), torch.quantile(x.float().abs(),s).item() if s else -1.)
            t=time.perf_counter(); [K.sparse_linear_cpu(x,tau,[w],None,K.GatherPlan(float('inf'),torch.get_num_threads())) for w in Wts]; res.setdefault(s,[]).append((time.perf_counter()-t)/n*1e3)
    print(dt,i,o,{k:round(statistics.median(v),3) for k,v in res.items()},flush=True)
