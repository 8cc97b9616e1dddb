#!/bin/bash
# Side by side, one after the other, on the same machine: dsvl2 (q8_0 folder, q8_0 GGUF, f32) and the official code (f32).
set -x
B=/work/main/target/release/dsvl2
IMG=/work/scratch/bench-640x480.png
P=$'<image>\nDescribe each stage of this image in detail.'
uptime
$B bench --model /work/scratch/tiny-random --image $IMG --prompt "$P" --max-new-tokens 128 --batch 1,8 --dtype q8_0 --json > final-q8-folder.json 2> final-q8-folder.err
$B bench --model /work/scratch/tiny-q8_0.gguf --image $IMG --prompt "$P" --max-new-tokens 128 --batch 1 --json > final-q8-gguf.json 2> final-q8-gguf.err
$B bench --model /work/scratch/tiny-random --image $IMG --prompt "$P" --max-new-tokens 128 --batch 1 --dtype f32 --json > final-f32.json 2> final-f32.err
cd /work/scratch/official && venv/bin/python time_official.py --model /work/scratch/tiny-random --image $IMG --prompt "$P" --max-new-tokens 128 --runs 1 > /work/scratch/final-official.json 2> /work/scratch/final-official.err
uptime
echo ALLDONE
