"""Pieces shared by the examples (segmentation, matting): one small, documented API.

    upsamplers   the upsampler registry: names -> Flax modules with one call convention
    training     data-parallel jit train step, the training loop (orbax checkpoints, resume,
                 Ctrl-C, progress bar, step time), seeds
    outputs      safe output folders (refuse to reuse a non-empty one unless --overwrite/--resume)
    stats        mean ± std over seeds ("n/a" for one seed), paired differences with a t-based
                 95% confidence interval
    cost         the paper's cost columns: parameters, FLOPs from XLA's cost analysis
    report       summary rows per upsampler, results.json / results.csv, the printed table
    cli          argparse helpers and the arguments every example shares

The protocol they implement (docs/design.md §7): the same network, data and seeds for every
upsampler; only the upsampling stages change.
"""
