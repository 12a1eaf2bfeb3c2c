#!/usr/bin/env bash
# Regenerate the AToM-OpenMM test inputs in this directory from the atom-openmm 8.4.0 sdist.
#
#   prepare.sh SDIST_DIR [OUT_DIR]
#
# SDIST_DIR is the unpacked atom_openmm-8.4.0 sdist (it must contain
# examples/ABFE/temoa-g1/temoa-g1.prmtop and .inpcrd). OUT_DIR defaults to the directory of
# this script and must hold temoa-g1_asyncre.cntl and nodefile (they are hand-written and
# not regenerated). make_atm_system_from_amber and abfe_structprep (pip install
# atom-openmm==8.4.0) must be on PATH. Structure preparation runs on the OpenMM CPU
# platform with OMP_NUM_THREADS threads (default 2) and takes about six minutes on two cores.
# The equilibrated state (temoa-g1_0.xml) comes from stochastic MD, so it differs from run
# to run; the system XML and the PDB are deterministic.
set -euo pipefail

sdist=${1:?usage: prepare.sh SDIST_DIR [OUT_DIR]}
out=${2:-$(cd "$(dirname "$0")" && pwd)}
example="$sdist/examples/ABFE/temoa-g1"
base=temoa-g1

for f in "$example/$base.prmtop" "$example/$base.inpcrd" "$out/${base}_asyncre.cntl" "$out/nodefile"; do
    [[ -f $f ]] || { echo "missing $f" >&2; exit 1; }
done

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cp "$example/$base.prmtop" "$example/$base.inpcrd" "$out/${base}_asyncre.cntl" "$out/nodefile" "$work/"
cd "$work"

# OpenMM System (PME, 0.9 nm cutoff, HBonds constraints) and topology PDB.
make_atm_system_from_amber --AmberPrmtopinFile "$base.prmtop" --AmberInpcrdinFile "$base.inpcrd" \
    --systemXMLoutFile "${base}_sys.xml" --systemPDBoutFile "$base.pdb"

# Minimise, thermalise, anneal to lambda=1/2 and equilibrate; writes ${base}_0.xml.
OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} abfe_structprep "${base}_asyncre.cntl"

# Keep only what abfe_production reads, compressed (gunzip before running).
for f in "${base}_sys.xml" "$base.pdb" "${base}_0.xml"; do
    gzip -9 -n -c "$f" > "$out/$f.gz"
done
ls -l "$out"
