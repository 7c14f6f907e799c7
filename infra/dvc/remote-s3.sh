# The DVC remote for an S3 bucket (or an S3-compatible server), run once from the repository
# root. The remote's URL and endpoint go to .dvc/config (committed); credentials go to
# .dvc/config.local (git-ignored) or stay in the environment (AWS_ACCESS_KEY_ID,
# AWS_SECRET_ACCESS_KEY, AWS_PROFILE), never to a committed file.
set -eu
: "${GM_DVC_BUCKET:?set GM_DVC_BUCKET, e.g. s3://your-bucket/gm}"
dvc remote add --default --force storage "$GM_DVC_BUCKET"
if [ -n "${GM_S3_ENDPOINT:-}" ]; then  # MinIO, Ceph, ...: http(s)://host:9000
  dvc remote modify storage endpointurl "$GM_S3_ENDPOINT"
fi
if [ -n "${AWS_ACCESS_KEY_ID:-}" ] && [ "${GM_STORE_KEYS_LOCALLY:-0}" = 1 ]; then
  dvc remote modify --local storage access_key_id "$AWS_ACCESS_KEY_ID"
  dvc remote modify --local storage secret_access_key "$AWS_SECRET_ACCESS_KEY"
fi
echo "DVC remote 'storage' → $GM_DVC_BUCKET; now: dvc push (data.dvc and every stage output)"
