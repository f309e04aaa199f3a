"""The conversion budgets of the tests, in one place: small enough for CI, and every stage still runs."""

# tiny random models (models.tiny_source and the random families), as CLI arguments and as ConvertOptions fields
TINY = ["--calib-tokens", "256", "--seq-len", "32", "--greedy-tokens", "64", "--sparsity-levels", "0.25,0.5"]
TINY_OPTIONS = dict(calib_tokens=256, seq_len=32, greedy_tokens=32, greedy_step=0.05, sparsity_levels=(0.25, 0.5),
                    default_sparsity=0.5)
# Gemma's tiny models: shorter sequences (its sliding window is 4 positions)
GEMMA_TINY = ["--calib-tokens", "128", "--seq-len", "16", "--greedy-tokens", "32", "--sparsity-levels", "0.25,0.5"]
# the real SmolLM2-135M: one session-wide conversion per method and transform (conftest.converted_smollm2)
# (greedy steps of 5%: the allocation's forwards are most of a conversion's time; the quality orderings the
# tests check hold at this step)
FAST_CONVERT = dict(calib_tokens=2048, seq_len=256, greedy_tokens=512, greedy_step=0.05,
                    sparsity_levels=(0.25, 0.5, 0.65), default_sparsity=0.5)
# the real SmolLM2-135M converted twice to compare two ways of reading it (streamed, whole)
SMOLLM2_BUDGET = dict(calib_tokens=256, seq_len=64, greedy_tokens=64, greedy_step=0.1, sparsity_levels=(0.25,),
                      default_sparsity=0.25)
