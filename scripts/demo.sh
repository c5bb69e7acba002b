#!/usr/bin/env bash
# The main job, from a fresh clone: set up the environment, ingest a real sample dataset
# (PAD-UFES-20, 686 smartphone skin-lesion images from ../shared/data), classify, search,
# evaluate retrieval, and print the results.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"

DATA=${MEDIRET_DATA:-../shared/data}
STORE=${MEDIRET_DEMO_STORE:-indexes/demo-pad-ufes-20}
IMAGES=("$DATA"/pad-ufes-20/images/*.png)  # a glob, not `ls | head`: head closing the pipe
QUERY=${IMAGES[0]}                          # early kills ls with SIGPIPE, which pipefail makes fatal

step() { printf '\n=== %s\n$ %s\n' "$1" "${*:2}"; "${@:2}"; }

step "Encoders (weights available offline?)" mediret encoders
step "Ingest PAD-UFES-20 with efficientnet-lite0 (resumes if already there)" \
    mediret ingest "$DATA/pad-ufes-20" --store "$STORE" --encoder efficientnet-lite0
step "What the store holds" mediret info --store "$STORE"
step "Classify: the paper's LR grid search, patient-disjoint split" \
    mediret classify --clf lr --split group --store "$STORE"
step "Classify: kNN over the FAISS index, same split" \
    mediret classify --clf knn --split group --store "$STORE"
step "Search: images most similar to $QUERY, other patients only" \
    mediret search "$QUERY" -k 5 --exclude-group --store "$STORE" --sheet "$STORE/demo-sheet.png"
step "Retrieval evaluation (test queries against the train database, group split)" \
    mediret evaluate-retrieval -k 1,5,10 --split group --store "$STORE"
printf '\nContact sheet written to %s\n' "$STORE/demo-sheet.png"
