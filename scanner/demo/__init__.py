"""The embedded demo: a corpus built from images shipped inside scikit-learn / scikit-image with planted
duplicates and memorization (corpus.py, truth.parquet), the demo diffusion models trained here on the CPU
(train.py: the pixel UNet; latent.py: a tiny text-to-image Stable Diffusion), `memscan demo` end to end
(run.py), and `memscan evaluate`, which scores a finished scan against the planted truth (evaluate.py)."""
