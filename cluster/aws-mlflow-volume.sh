#!/usr/bin/env bash
# Attach MLflow's kept EBS volume to this head node and mount it (aws-gpu.yaml runs this in
# head_setup_commands, before `mlflow server` starts on it).
#
#   cluster/aws-mlflow-volume.sh VOLUME_ID MOUNT_POINT
#
# The volume is created once, by you, in the head's availability zone (cluster/README.md).
# `ray down` terminates the head and with it the head's root disk, but not this volume: it
# keeps MLflow's sqlite database (runs, params, metrics, the model registry), and the next
# `ray up` attaches it again. A new, empty volume is formatted (ext4) the first time.
# The head's default profile (ray-autoscaler-v1, AmazonEC2FullAccess) may attach volumes.
set -euo pipefail
volume=$1
mount_point=$2
if mountpoint -q "$mount_point"; then exit 0; fi
token=$(curl -sf -X PUT http://169.254.169.254/latest/api/token -H "X-aws-ec2-metadata-token-ttl-seconds: 300")
metadata() { curl -sf -H "X-aws-ec2-metadata-token: $token" "http://169.254.169.254/latest/meta-data/$1"; }
instance=$(metadata instance-id)
region=$(metadata placement/region)
# boto3 comes with the package's `aws` extra (setup_commands installed it into ~/venv)
~/venv/bin/python - "$volume" "$instance" "$region" <<'PY'
import sys

import boto3

volume, instance, region = sys.argv[1:]
ec2 = boto3.client("ec2", region_name=region)
attachments = ec2.describe_volumes(VolumeIds=[volume])["Volumes"][0]["Attachments"]
if not any(a["InstanceId"] == instance for a in attachments):
    ec2.attach_volume(VolumeId=volume, InstanceId=instance, Device="/dev/sdf")
ec2.get_waiter("volume_in_use").wait(VolumeIds=[volume])
PY
# Nitro instances name an EBS volume's NVMe device by its id (without the dash)
device=/dev/disk/by-id/nvme-Amazon_Elastic_Block_Store_${volume/-/}
for _ in $(seq 90); do [ -e "$device" ] && break; sleep 2; done
[ -e "$device" ] || { echo "aws-mlflow-volume: $volume attached but $device never appeared" >&2; exit 1; }
sudo blkid "$device" > /dev/null || sudo mkfs.ext4 -q "$device"
sudo mkdir -p "$mount_point"
sudo mount "$device" "$mount_point"
sudo chown "$(id -u):$(id -g)" "$mount_point"
