#!/usr/bin/env bash
# The add-on's options (/data/options.json, or $PRIMA_OPTIONS) turned into the arguments of
# `prima-node serve`.
#
# Sourced (by the service's run script and by the discovery oneshot) it defines:
#   prima_role   the node's effective role: standalone, head or worker
#   prima_port   the port the node listens on
#   prima_opt    one option's value (empty when unset)
#   prima_args   fills the array PRIMA_ARGV with the arguments after `prima-node serve`
# Run directly it prints those arguments, one per line (for tests and for debugging). Secrets go
# to files (see prima_secret_file), never on the command line.
#
# Needs bash and jq (both in Home Assistant's base images); bashio is only used for logging, when
# it is loaded.

PRIMA_OPTIONS="${PRIMA_OPTIONS:-/data/options.json}"
PRIMA_STATE_DIR="${PRIMA_STATE_DIR:-/data}"

prima_log() {  # LEVEL MESSAGE
    local level="$1"
    shift
    if command -v "bashio::log.${level}" >/dev/null 2>&1; then
        "bashio::log.${level}" "$*"
    else
        printf '[%s] %s\n' "${level}" "$*" >&2
    fi
}

# The value of option $1 as text; empty when it is missing or null. Booleans come out as
# true/false.
prima_opt() {
    jq -r --arg k "$1" 'if has($k) and .[$k] != null then .[$k] | tostring else "" end' \
        "${PRIMA_OPTIONS}"
}

# Fails, saying why, when the options file is missing or not a JSON object.
prima_check() {
    if ! jq -e 'type == "object"' "${PRIMA_OPTIONS}" >/dev/null 2>&1; then
        prima_log error "cannot read the options from ${PRIMA_OPTIONS}"
        return 1
    fi
}

# Writes secret $2 to a file only this user can read, in $PRIMA_SECRETS_DIR (default /run/prima,
# memory only), and prints its path: on the command line a secret would show in `ps`.
prima_secret_file() {
    local dir="${PRIMA_SECRETS_DIR:-/run/prima}"
    (umask 077 && mkdir -p "${dir}" && printf '%s\n' "$2" >"${dir}/$1")
    printf '%s\n' "${dir}/$1"
}

prima_port() {
    local port
    port="$(prima_opt port)"
    printf '%s\n' "${port:-8080}"
}

# standalone (no cluster secret), head or worker. Fails, saying why, on a combination the node
# would refuse.
prima_role() {
    local role secret peers
    prima_check || return 1
    role="$(prima_opt role)"
    secret="$(prima_opt cluster_secret)"
    peers="$(jq -r '(.peers // []) | map(select(. != null and (tostring | test("\\S")))) | length' \
        "${PRIMA_OPTIONS}")"
    case "${role:-auto}" in
        auto)
            if [[ -z "${secret}" ]]; then
                if ((peers > 0)); then
                    prima_log error "peers are set but no cluster_secret: a cluster needs one"
                    return 1
                fi
                echo standalone
            else
                echo head  # the add-on serves Home Assistant: with a secret it leads the cluster
            fi
            ;;
        head | worker)
            if [[ -z "${secret}" ]]; then
                prima_log error "role ${role} needs a cluster_secret (at least 8 characters)"
                return 1
            fi
            echo "${role}"
            ;;
        *)
            prima_log error "unknown role '${role}' (auto, head or worker)"
            return 1
            ;;
    esac
}

prima_args() {
    local role model secret key threads prefetch level peer name
    role="$(prima_role)" || return 1
    model="$(prima_opt model)"
    if [[ -z "${model}" ]]; then
        prima_log error "set the model option to a GGUF file (e.g. /share/prima/model.gguf)"
        return 1
    fi
    PRIMA_ARGV=(--host 0.0.0.0 --port "$(prima_port)" --state-dir "${PRIMA_STATE_DIR}"
        --model "${model}")
    local ctx
    ctx="$(prima_opt context)"
    if [[ -n "${ctx}" ]]; then
        PRIMA_ARGV+=(--ctx "${ctx}")
    fi
    threads="$(prima_opt threads)"
    if [[ -n "${threads}" && "${threads}" != 0 ]]; then
        PRIMA_ARGV+=(--threads "${threads}")
    fi
    prefetch="$(prima_opt prefetch)"
    if [[ "${prefetch}" == false ]]; then
        PRIMA_ARGV+=(--prefetch off)
    else
        PRIMA_ARGV+=(--prefetch on)
    fi
    level="$(prima_opt log_level)"
    PRIMA_ARGV+=(--log-level "${level:-info}")
    name="$(prima_opt name)"
    if [[ -n "${name}" ]]; then
        PRIMA_ARGV+=(--name "${name}")
    fi
    secret="$(prima_opt cluster_secret)"
    if [[ "${role}" != standalone ]]; then
        PRIMA_ARGV+=(--cluster-secret-file "$(prima_secret_file cluster-secret "${secret}")")
    fi
    if [[ "${role}" == head ]]; then
        PRIMA_ARGV+=(--head)
    fi
    while IFS= read -r peer; do
        [[ -n "${peer}" ]] || continue
        if [[ "${role}" == head ]]; then
            PRIMA_ARGV+=(--peer "${peer}")
        else
            prima_log warning "peer ${peer} ignored: only a head includes peers"
        fi
    done < <(jq -r '(.peers // [])[] | select(. != null) | tostring | gsub("^\\s+|\\s+$"; "")' \
        "${PRIMA_OPTIONS}")
    key="$(prima_opt api_key)"
    if [[ -n "${key}" ]]; then
        PRIMA_ARGV+=(--api-key-file "$(prima_secret_file api-key "${key}")")
    fi
}

if [[ "${BASH_SOURCE[0]}" == "${0}" ]]; then
    set -euo pipefail
    if [[ $# -gt 0 ]]; then
        PRIMA_OPTIONS="$1"
    fi
    prima_args
    printf '%s\n' "${PRIMA_ARGV[@]}"
fi
