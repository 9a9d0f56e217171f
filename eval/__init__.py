"""vlmdrop.eval: VQA benchmark harness (lmms-eval-exact metrics, method x budget sweeps,
speed and memory, resumable JSONL results, sharding with accelerate).

    vlmdrop eval --task easyvqa --method hired,random --budget 0.1,0.2 --limit 20 --out runs/

Modules: ``metrics`` (pure functions), ``tasks`` (loaders + registry), ``runner`` (sweep),
``report`` (markdown / CSV / PNG), ``cli``.
"""
