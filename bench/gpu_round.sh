#!/usr/bin/env bash
# One lent-GPU round of issue 31's measurements, as the device tool runs it:
#   bash bench/gpu_round.sh STEP...      (from the repository root; logs under $OUT)
# Steps: regions-prof, regions, regions-small, regions-mobilenet, clipagree, clip, clip-default, clip-both,
# clip-threads, clip-host, clip-nvimg, decode-mix, clip-ceilings, safety.
# Needs the carried site (.carry/site.tar.xz: ray, open_clip, ... for Python
# 3.12), for clipagree the demo's rows (.carry/demo_rows.parquet) and for
# clip-nvimg nvImageCodec's wheels (.carry/nvimg.tar.xz, docs/gpu.md).
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT" /tmp/site
T0=$(date +%s)
if [ ! -f /tmp/site/.done ]; then
  tar -xJf .carry/site.tar.xz -C /tmp/site && touch /tmp/site/.done
fi
if [ -f .carry/nvimg.tar.xz ] && [ ! -f /tmp/site/.nvimg ]; then  # nvImageCodec + nvJPEG wheels, unzipped
  tar -xJf .carry/nvimg.tar.xz -C /tmp/site && touch /tmp/site/.nvimg
fi
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1 NO_ALBUMENTATIONS_UPDATE=1 RAY_USAGE_STATS_ENABLED=0
card=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
case "$card" in *H200*) tag=h200 ;; *H100*) tag=h100 ;; *) tag=gpu ;; esac
echo "card: $card ($tag); untar $(( $(date +%s) - T0 ))s"
python3 -c "import ray, open_clip, torch, torchvision; print('ray', ray.__version__, 'open_clip', open_clip.__version__, 'torch', torch.__version__, 'tv', torchvision.__version__)" || exit 3
step() {  # name, seconds, command...
  local name=$1 secs=$2; shift 2
  echo "=== $name (limit ${secs}s) at +$(( $(date +%s) - T0 ))s"
  timeout -s TERM "$secs" "$@" > "$OUT/$name-$tag-20261207.log" 2>&1
  echo "=== $name rc=$? at +$(( $(date +%s) - T0 ))s"
  grep -v -E "INFO|WARNING|Warning|warn\(|^\s*$|core_worker|USDT|pynvml" "$OUT/$name-$tag-20261207.log" | tail -60
}
for s in "$@"; do
  case $s in
    regions-prof) step regions-r50-profile 160 python3 bench/regions_profile.py --device cuda --model r50 \
        --plans inproc,ray-1a2t,ray-2a2t ;;
    regions) step regions-r50 240 python3 bench/regions.py --device cuda --models r50 --r50-share 1.0 \
        --n 4096 --batch-size 128 --micro-batch 128 --plans inproc,ray-1a2t ;;
    regions-small) step regions-r50 200 python3 bench/regions.py --device cuda --models r50 --r50-share 1.0 \
        --n 2048 --batch-size 64 --micro-batch 64 --plans inproc,ray-1a2t ;;
    regions-mobilenet) step regions-mobilenet 200 python3 bench/regions.py --device cuda --models mobilenet \
        --n 8192 --batch-size 256 --plans inproc,ray-1a2t,ray-1a4t,ray-2a2t ;;
    clipagree) step clip-agreement 200 python3 bench/clipagree.py --device cuda --settings eager,casts \
        --demo-rows .carry/demo_rows.parquet ;;
    clip) step clip 315 python3 bench/clip_score.py --device cuda --compile --skip parts,agreement \
        --plans eager,compiled,ray-nvjpeg-2a,ray-nvjpeg-2a+compiled ;;
    clip-default|clip-both) mkdir -p "$OUT/raystats"
        if [ "$s" = clip-default ]; then plans=eager,compiled,ray-nvjpeg-2a,ray-nvjpeg-1a4t head=ray-nvjpeg-2a
        else plans=eager,compiled,ray-nvjpeg-2a+compiled,ray-nvjpeg-1a4t+compiled head=ray-nvjpeg-2a+compiled; fi
        step clip 340 python3 bench/clip_score.py --device cuda --compile --skip parts,agreement --budget-s 230 \
            --ray-stats "$OUT/raystats" --plans $plans --headline $head ;;
    clip-threads) step clip-threads 270 python3 bench/clip_score.py --device cuda --compile --skip parts,agreement \
        --n 40960 --batch-size 1024 --budget-s 210 --plans compiled,ray-nvjpeg-1a4t+compiled,ray-nvjpeg-1a8t+compiled \
        --headline ray-nvjpeg-1a8t+compiled ;;
    clip-host) step clip-host 220 python3 bench/clip_score.py --device cuda --compile --skip parts,agreement \
        --n 40960 --batch-size 2048 --passes 2 --budget-s 130 --plans compiled,inproc4,ray-nvjpeg-1a4t \
        --headline ray-nvjpeg-1a4t ;;
    clip-nvimg) step clip-nvimg 330 python3 bench/clip_score.py --device cuda --compile --skip agreement \
        --parts-n 8192 --n 40960 --batch-size 2048 --passes 3 --budget-s 250 --ray-windows \
        --plans compiled,ray-nvimgmix-1a4t,ray-nvimgcodec-1a4t,ray-nvjpeg-1a4t --headline ray-nvimgmix-1a4t ;;
    decode-mix) step decode-mix 150 python3 bench/decode_probe.py --n 10240 --nv-threads 8 --budget-s 110 \
        --decoders torchvision,nvimgcodec-hw,nvimgcodec-hybrid,nvimgcodec-mix,stage:nvjpeg ;;
    clip-ceilings) step clip-ceilings 75 python3 bench/clip_score.py --device cuda --compile --skip parts,agreement \
        --n 20480 --plans eager,compiled ;;
    safety) step safety-nsfw 150 python3 bench/safety.py --device cuda --plans nsfw ;;
    *) echo "unknown step $s" ;;
  esac
done
echo "done at +$(( $(date +%s) - T0 ))s"
