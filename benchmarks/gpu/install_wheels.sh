# shellcheck shell=bash
# Sourced by the GPU scripts: makes megatron-core and braceexpand importable for ${python}, installing
# them from the wheels in ${wheels} (made on an x86-64 host with
#   python3 -m pip download --no-deps -d .whl megatron-core==0.19.2 braceexpand==0.1.7)
# into /tmp/megatron_v2pe_site where the image lacks them. Returns non-zero when it cannot.
site=/tmp/megatron_v2pe_site
[[ -d "${site}" ]] && export PYTHONPATH="${site}${PYTHONPATH:+:${PYTHONPATH}}"
missing=()
for module in megatron.core braceexpand; do
  "${python}" -c "import ${module}" 2>/dev/null || missing+=("${module}")
done
if ((${#missing[@]})); then
  if ! compgen -G "${wheels}/*.whl" >/dev/null; then
    echo "missing on this machine: ${missing[*]}; no wheels in '${wheels}' to install them from" >&2
    return 1
  fi
  "${python}" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "${site}" "${wheels}"/*.whl || return 1
  export PYTHONPATH="${site}${PYTHONPATH:+:${PYTHONPATH}}"
fi
