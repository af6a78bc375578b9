# shellcheck shell=bash disable=SC2034  # PROGRAM_ARGS is read by the sourcing script
# Shell functions shared by launch/local.sh and launch/tpu_pod.sh (sourced, not run):
# option parsing and command quoting.
# launch/gpu_slurm.sbatch keeps its own: sbatch copies the script to a spool directory,
# away from this file.
#
# parse_options "FLAG_OPTIONS" "VALUE_OPTIONS" "HINT" "$@"
#   FLAG_OPTIONS, VALUE_OPTIONS: space-separated option names (e.g. "--dry_run --reuse").
#   Accepts `--opt value` and `--opt=value`; for each option calls the caller's
#   `set_option NAME VALUE` (VALUE empty for a flag). -h/--help calls the caller's `usage`
#   and exits 0. Stops at `--`; what follows it is left in the array PROGRAM_ARGS. An
#   unknown option, a flag given a value or a value option without one calls the caller's
#   `die` with a message (HINT is appended to the unknown-option message).

parse_options() {
  local _po_flags=" $1 " _po_values=" $2 " _po_hint=$3
  shift 3
  PROGRAM_ARGS=()
  local _po_arg _po_name _po_value _po_inline
  while (($#)); do
    _po_arg=$1
    shift
    if [[ $_po_arg == "--" ]]; then
      PROGRAM_ARGS=("$@")
      return 0
    fi
    _po_name=$_po_arg
    _po_value=""
    _po_inline=0
    if [[ $_po_arg == --*=* ]]; then
      _po_name=${_po_arg%%=*}
      _po_value=${_po_arg#*=}
      _po_inline=1
    fi
    if [[ $_po_name == -h || $_po_name == --help ]]; then
      usage
      exit 0
    elif [[ $_po_flags == *" $_po_name "* ]]; then
      ((_po_inline == 0)) || die "option $_po_name takes no value (got '$_po_arg')"
      set_option "$_po_name" ""
    elif [[ $_po_values == *" $_po_name "* ]]; then
      if ((_po_inline == 0)); then
        if (($# == 0)) || [[ $1 == --* ]]; then die "option $_po_name needs a value"; fi
        _po_value=$1
        shift
      fi
      set_option "$_po_name" "$_po_value"
    else
      die "unknown option '$_po_arg' ($_po_hint)"
    fi
  done
}

# Shell-quote each word (single quotes where needed, readable for multi-line scripts).
quote_cmd() {
  local out="" word
  for word in "$@"; do
    if [[ $word =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
      out+="$word "
    else
      out+="'${word//\'/\'\\\'\'}' "
    fi
  done
  printf '%s\n' "${out% }"
}
