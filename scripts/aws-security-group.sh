#!/usr/bin/env bash
# Make the security group of ray-cluster.yaml: SSH (22) only from YOUR_CIDR, all traffic between the
# cluster's own nodes, nothing else from outside (the launcher's default group opens SSH to 0.0.0.0/0).
# Prints the group id for the `SecurityGroupIds` lines marked `# >>> SET: security-group`.
#
#   scripts/aws-security-group.sh 203.0.113.7/32 [vpc-id]     # region: AWS_DEFAULT_REGION or AWS_REGION
#
# The dashboard, GCS and object manager stay closed to the outside: reach the dashboard with `ray dashboard`.
set -euo pipefail
cidr="${1:-}"
vpc="${2:-}"
name="${BAGNET_SECURITY_GROUP:-bagnet-ray}"
die() { echo "aws-security-group.sh: $*" >&2; exit 1; }
[[ "$cidr" =~ ^[0-9]{1,3}(\.[0-9]{1,3}){3}/[0-9]{1,2}$ || "$cidr" =~ ^[0-9a-fA-F:]+/[0-9]{1,3}$ ]] \
  || die "usage: scripts/aws-security-group.sh <your CIDR, e.g. 203.0.113.7/32> [vpc-id]"
case "$cidr" in
  0.0.0.0/0|::/0) die "$cidr opens SSH to the whole internet: give the address range you connect from" ;;
esac
if [ -z "$vpc" ]; then
  vpc=$(aws ec2 describe-vpcs --filters Name=is-default,Values=true --query 'Vpcs[0].VpcId' --output text)
  [ -n "$vpc" ] && [ "$vpc" != None ] || die "no default VPC in this region: pass the VPC id"
fi
group=$(aws ec2 create-security-group --group-name "$name" --vpc-id "$vpc" \
  --description "bagnet Ray cluster: SSH from $cidr, all traffic inside the group" --query GroupId --output text)
aws ec2 authorize-security-group-ingress --group-id "$group" \
  --ip-permissions "IpProtocol=-1,UserIdGroupPairs=[{GroupId=$group}]" >/dev/null
if [[ "$cidr" == *:* ]]; then
  aws ec2 authorize-security-group-ingress --group-id "$group" \
    --ip-permissions "IpProtocol=tcp,FromPort=22,ToPort=22,Ipv6Ranges=[{CidrIpv6=$cidr}]" >/dev/null
else
  aws ec2 authorize-security-group-ingress --group-id "$group" --protocol tcp --port 22 --cidr "$cidr" >/dev/null
fi
echo "$group"
