#!/usr/bin/env bash
# Issue 26's latent-path sweep: the auto-encoder of the `cpu` preset trained 500 steps from a
# trained cpu MDLM, once per latent-path setting (the cpu preset, the paper's values, and the
# cpu preset with one key changed), then its argmax recovery from all-masked held-out rows
# given the row's own latent, another row's and noise (`diladiff eval-recon`). Gate: own >=
# other row + 10 points. Resumable: a setting whose result JSON exists is skipped.
#
#   scripts/latent_path_sweep.sh MDLM_RUN [OUT_DIR]     (default OUT_DIR runs/latent_sweep)
#
# SWEEP_STEPS (default 500) and SWEEP_OVERRIDES (key=value words applied to every setting, e.g.
# "model.positions=learned" for an MDLM trained with the learned position table).
set -euo pipefail
mdlm=${1:?usage: scripts/latent_path_sweep.sh MDLM_RUN [OUT_DIR]}
out=${2:-runs/latent_sweep}
steps=${SWEEP_STEPS:-500}
extra=${SWEEP_OVERRIDES:-}
declare -A settings=(
  [cpu]=""
  [paper]="autoencoder.feature_layer=-1 autoencoder.cross_attn_after=first,last autoencoder.decoder_lr_scale=0.1 autoencoder.p_drop_warmup_steps=0 autoencoder.full_mask_share=0"
  [full_mask_0.5]="autoencoder.full_mask_share=0.5"
  [p_drop_constant]="autoencoder.p_drop_warmup_steps=0"
  [layer_last]="autoencoder.feature_layer=-1"
  [cross_attn_first_last]="autoencoder.cross_attn_after=first,last"
  [full_mask_0]="autoencoder.full_mask_share=0"
  [decoder_lr_0.1]="autoencoder.decoder_lr_scale=0.1"
)
order=(cpu paper full_mask_0.5 p_drop_constant layer_last cross_attn_first_last full_mask_0 decoder_lr_0.1)
mkdir -p "$out"
for name in "${order[@]}"; do
  result="$out/$name.json"
  [[ -f $result ]] && { echo "[sweep] $name: done"; continue; }
  # shellcheck disable=SC2086  # the settings are separate key=value words
  diladiff train autoencoder --preset cpu --run-dir "$out/$name" --init-from "$mdlm" \
    train.max_steps="$steps" train.progress=false $extra ${settings[$name]}
  diladiff eval-recon "$out/$name" --sequences 256 --mc-samples 4 --json "$result.tmp"
  mv "$result.tmp" "$result"
done
