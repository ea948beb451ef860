#!/usr/bin/env bash
# Removes a snatgw lab by hand (after a test run was killed before it could clean up):
# kills the processes inside every namespace of the lab with prefix PREFIX, then deletes
# those namespaces. Same matching as snatgw-lab: PREFIX is [a-z0-9]+- and a namespace
# belongs to it when its text up to the first '-' equals PREFIX. Touches nothing else.
set -euo pipefail
prefix="${1:-}"
if [[ ! "$prefix" =~ ^[a-z0-9]+-$ ]]; then
    echo "usage: $0 PREFIX   (PREFIX like sg1-: [a-z0-9]+ followed by one '-')" >&2
    exit 2
fi
for ns in $(ip netns list | awk '{print $1}'); do
    [[ "$ns" == "$prefix"* && "${ns%%-*}-" == "$prefix" ]] || continue
    for pid in $(ip netns pids "$ns"); do
        [[ "$pid" != "$$" ]] && kill -9 "$pid" 2>/dev/null || true
    done
    ip netns del "$ns" && echo "deleted $ns"
done
