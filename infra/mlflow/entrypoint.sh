# Starts `mlflow server` with everything secret taken from the environment:
#   MLFLOW_BACKEND_STORE_URI   postgresql://USER:PASSWORD@HOST:5432/mlflow
#   MLFLOW_ARTIFACTS_DESTINATION  s3://BUCKET/artifacts (served through this server)
#   MLFLOW_S3_ENDPOINT_URL     an S3-compatible endpoint (MinIO, Ceph ...); unset for AWS S3
#   AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY   the artifact store's credentials
#   MLFLOW_ADMIN_PASSWORD      the first admin's password (basic auth); no default exists
#   MLFLOW_FLASK_SERVER_SECRET_KEY   signs sessions (basic auth)
set -eu
: "${MLFLOW_BACKEND_STORE_URI:?set it (postgresql://...)}"
: "${MLFLOW_ARTIFACTS_DESTINATION:?set it (s3://bucket/artifacts)}"
: "${MLFLOW_ADMIN_PASSWORD:?set it: basic auth has no default password here}"
: "${MLFLOW_FLASK_SERVER_SECRET_KEY:?set it}"
auth_dir=$(mktemp -d)
cat > "$auth_dir/basic_auth.ini" <<INI
[mlflow]
default_permission = READ
database_uri = ${MLFLOW_BACKEND_STORE_URI}
admin_username = admin
admin_password = ${MLFLOW_ADMIN_PASSWORD}
INI
export MLFLOW_AUTH_CONFIG_PATH="$auth_dir/basic_auth.ini"
exec mlflow server \
  --host "${MLFLOW_HOST:-0.0.0.0}" --port "${MLFLOW_PORT:-5000}" --workers "${MLFLOW_WORKERS:-2}" \
  --backend-store-uri "$MLFLOW_BACKEND_STORE_URI" \
  --artifacts-destination "$MLFLOW_ARTIFACTS_DESTINATION" \
  --serve-artifacts \
  --app-name basic-auth
